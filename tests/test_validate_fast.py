"""``specsight validate`` of a spec whose model was read before imports neither torch nor
transformers: the model's ModelInfo and tokenizer come from a torch-free cache on disk, equal to
what reading the model gives, and a torn cache entry is read past, not trusted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from specsight.models.info_cache import cached_info
from specsight.models.load import load_model_info
from specsight.spec import load_spec
from tests.conftest import CLEAN

PROBE = (
    "import sys; from specsight.api import validate; note = validate(sys.argv[1]); "
    "print(note, 'torch' in sys.modules, 'transformers' in sys.modules)"
)


#: a validate that fails: whether it named the layer, and whether torch was imported
FAILING = (
    "import sys\nfrom specsight.api import validate\nfrom specsight.errors import SpecError\n"
    "try:\n    validate(sys.argv[1])\nexcept SpecError as exc:\n"
    "    print('layer' in str(exc), 'torch' in sys.modules)\n"
)


def _validate(path, cache, code: str = PROBE) -> str:
    """What ``code`` prints validating ``path`` in a fresh interpreter using ``cache``."""
    env = {**os.environ, "SPECSIGHT_CACHE": str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_second_validate_needs_no_torch(tmp_path):
    spec = {
        "specsight": 1,
        "model": "tiny-gpt2",
        "invokes": {"a": {"prompt": CLEAN, "ops": [{"op": "zero", "site": "mlp_out.1"}]}},
        "metrics": {"p": {"kind": "prob", "invoke": "a", "token": " Mary"}},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    cache = tmp_path / "cache"
    assert _validate(path, cache) == "None True True"  # compiled, reading the model once
    assert _validate(path, cache) == "None False False"  # compiled again, from the cache
    # a bad spec is still caught from the cache: the site does not exist in a 4-layer model
    spec["invokes"]["a"]["ops"][0]["site"] = "mlp_out.9"
    path.write_text(yaml.safe_dump(spec))
    assert _validate(path, cache, FAILING) == "True False"
    entries = list((cache / "info").glob("*.json"))
    assert len(entries) == 1
    os.environ["SPECSIGHT_CACHE"], old = str(cache), os.environ.get("SPECSIGHT_CACHE")
    try:
        ref = load_spec(path).model
        info, tokenizer = cached_info(ref)
        fresh_info, fresh_tokenizer = load_model_info("tiny-gpt2")
        assert info == fresh_info
        assert tokenizer.encode(CLEAN) == fresh_tokenizer.encode(CLEAN)
        assert tokenizer.pad_id == fresh_tokenizer.pad_id
        entries[0].write_text(json.dumps({"info": {"half": "written"}}))
        assert cached_info(ref) is None  # torn: read the model again
    finally:
        if old is None:
            os.environ.pop("SPECSIGHT_CACHE")
        else:
            os.environ["SPECSIGHT_CACHE"] = old

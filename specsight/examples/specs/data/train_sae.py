"""Train a small sparse autoencoder (SAE) on the built-in model's residual stream after layer 6.

The SAE reads ``resid_post.6`` of ``smollm2-135m`` (the output hidden state of
``model.model.layers[6]``; ``blocks.6.hook_resid_post`` in SAELens/TransformerLens names) and
is saved in SAELens's folder format: ``cfg.json`` and ``sae_weights.safetensors`` with
``W_enc [576, 768]``, ``W_dec [768, 576]``, ``b_enc [768]`` and ``b_dec [576]`` (float32). It is
a standard ReLU SAE with ``apply_b_dec_to_input`` true::

    f = relu((x - b_dec) @ W_enc + b_enc)        x_hat = f @ W_dec + b_dec

Nothing is downloaded. The training text is

* the prompts and texts of ``specs/data/*.jsonl`` (facts, IOI, sentiment), and
* text the model writes itself: seeded sampling (top-k 50) from seed prompts built here from
  topic lists (countries, cities, animals, food, numbers, code, emotions, sport, science...).

Every document is run through layers 0..6 (the rest is skipped) in its own context, then again
packed end to end into fixed windows (a few shuffles: the same tokens in other contexts). The
first position of every sequence is left out (its norm is ~7x the others'; a few frequent tokens
such as `` the`` also carry norms of 500-900 at this layer: they are kept). One document in ten
is held out; the fraction of variance explained (FVE, also over the held-out positions whose
norm is under 3x the median), mean L0 and the fraction of dead latents are printed for it and
stored in ``cfg.json``'s ``metadata``.

Loss: MSE + L1 on the feature activations times the decoder rows' norms (so shrinking the
decoder does not cheat the penalty), Adam, fixed seeds, deterministic algorithms, a fixed number
of threads. The run is deterministic on a given machine and library versions (two runs gave
byte-identical files). Takes about 3.5 minutes on 2 idle CPU cores: ~2.3 to sample ~21k tokens
of text and read the activations, ~1 to train (far longer when other processes share the
cores). Run from the repository root::

    .venv/bin/python specs/data/train_sae.py [--out specs/data/saes/res6]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from specsight.models.load import load_model

DATA = Path(__file__).resolve().parent
OUT = DATA / "saes" / "res6"
MODEL_ID = "smollm2-135m"
LAYER = 6
D_IN, D_SAE = 576, 768
SEED = 0
THREADS = 2

# text generation
GEN_BATCH = 64
GEN_TOKENS = 40
TOP_K = 50
# activations: packed windows of this many tokens, this many shuffles
WINDOW = 128
PACKINGS = 4
HOLDOUT_EVERY = 10  # every 10th document is held out
# SAE training
STEPS = 1500
BATCH = 1024
LR = 1e-3
L1_COEFF = 0.05  # times the activations' root mean square norm
L1_WARMUP = 0.1  # fraction of the steps over which the L1 coefficient ramps up from 0
LR_DECAY = 0.2  # fraction of the steps (at the end) over which the learning rate decays to 0

COUNTRIES = """France|Germany|Italy|Spain|Japan|China|India|Brazil|Mexico|Canada|Egypt|Kenya|
Russia|Australia|Greece|Sweden|Norway|Poland|Turkey|Argentina|Peru|Ireland|Portugal|Vietnam|
Thailand|Nigeria|Morocco|Iran|Switzerland|the Netherlands|South Korea|Indonesia"""
CITIES = """Paris|London|Berlin|Rome|Madrid|Tokyo|Beijing|New York|Moscow|Cairo|Sydney|Toronto|
Mumbai|Istanbul|Lisbon|Vienna|Amsterdam|Chicago|Los Angeles|Rio de Janeiro|Bangkok|Athens|
Dublin|Stockholm|Seoul|Buenos Aires|Nairobi|Lyon|Marseille|Venice|Barcelona|Munich"""
ANIMALS = """dog|cat|horse|elephant|lion|tiger|whale|dolphin|eagle|owl|snake|frog|bee|ant|
penguin|rabbit|wolf|bear|shark|parrot|cow|sheep|monkey|giraffe"""
FOODS = """pizza|sushi|bread|cheese|chocolate|rice|pasta|apples|soup|coffee|tea|tacos|
croissants|curry|salad|noodles|ice cream|pancakes|wine|beer"""
TOPICS = """football|tennis|basketball|chess|the piano|jazz|painting|photography|physics|
chemistry|astronomy|the ocean|volcanoes|rain|winter|summer|the moon|computers|the internet|
electricity|democracy|the Roman Empire|World War II|the Renaissance|medicine|gardening"""
EMOTIONS = """happy|sad|angry|afraid|excited|lonely|proud|nervous|grateful|bored|jealous|calm"""
PEOPLE = """My mother|My best friend|The teacher|The doctor|Our neighbour|The old man|
The little girl|The president|A young farmer|The scientist"""

PLACE_TEMPLATES = [
    "The capital of {x} is",
    "{x} is a country known for",
    "Last summer we travelled to {x}, and",
    "The people of {x} speak",
    "The history of {x} began",
]
CITY_TEMPLATES = [
    "{x} is a city in",
    "The most famous building in {x} is",
    "I grew up in {x}, where",
    "The weather in {x} today is",
]
OTHER_TEMPLATES = {
    "animal": ["The {x} is an animal that", "My favourite animal is the {x} because"],
    "food": ["The best {x} I ever had was", "To make good {x}, you need"],
    "topic": ["Here is a short explanation of {x}:", "Everyone should know that {x}"],
    "emotion": ["{p} felt {x} when", "I was so {x} that"],
}
EXTRA_PROMPTS = [
    "1, 2, 3, 4, 5,",
    "The year 1492 was",
    "In 2023, the population was about",
    "Twelve plus seven equals",
    "The price went up from $45 to",
    "def fibonacci(n):\n",
    "import numpy as np\n\n",
    "for (int i = 0; i < n; i++) {\n",
    "<html>\n<head>\n",
    "SELECT name, age FROM",
    "Dear Sir or Madam,\n\n",
    "Once upon a time, there was",
    "Breaking news:",
    "Q: What is the largest planet?\nA:",
    "Step 1: Preheat the oven to",
    "The meeting is on Monday at 10 am in room",
    'She said: "',
    "Chapter 1\n\n",
    "Ingredients:\n-",
    "The results of the experiment show that",
]


def split(items: str) -> list[str]:
    return [s.strip() for s in items.split("|")]


def seed_prompts() -> list[str]:
    """The prompts the model continues: every template with every subject, in a fixed order."""
    prompts = [t.format(x=c) for c in split(COUNTRIES) for t in PLACE_TEMPLATES]
    prompts += [t.format(x=c) for c in split(CITIES) for t in CITY_TEMPLATES]
    people = split(PEOPLE)
    for kind, items in (
        ("animal", ANIMALS),
        ("food", FOODS),
        ("topic", TOPICS),
        ("emotion", EMOTIONS),
    ):
        for i, x in enumerate(split(items)):
            for t in OTHER_TEMPLATES[kind]:
                prompts.append(t.format(x=x, p=people[i % len(people)]))
    return prompts + EXTRA_PROMPTS


def jsonl_texts() -> list[str]:
    """The prompts and texts of the example data sets (facts with their answers)."""
    texts = []
    for path in sorted(DATA.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "prompt" in row:
                texts.append(row["prompt"] + row.get("answer", ""))
            texts += [row[k] + row.get("io", "") for k in ("clean", "corrupt") if k in row]
            if "text" in row:
                texts.append(row["text"])
    return texts


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: list[list[int]], eos: int) -> list[list[int]]:
    """Each prompt followed by GEN_TOKENS sampled tokens (cut at the first end token); batches
    are left-padded and seeded by their index."""
    docs = []
    for start in range(0, len(prompts), GEN_BATCH):
        batch = prompts[start : start + GEN_BATCH]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[eos] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        torch.manual_seed(SEED + start)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            top_k=TOP_K,
            temperature=1.0,
            max_new_tokens=GEN_TOKENS,
            pad_token_id=eos,
        )
        for prompt, row in zip(batch, out[:, width:].tolist()):
            new = row[: row.index(eos)] if eos in row else row
            docs.append(prompt + new)
        print(f"  generated {start + len(batch)}/{len(prompts)}", flush=True)
    return docs


class _Stop(Exception):
    """Raised by the hook once layer LAYER has run: the layers above are not needed."""


@torch.no_grad()
def resid(model: torch.nn.Module, batch: list[list[int]], pad: int) -> list[torch.Tensor]:
    """resid_post.LAYER of each sequence (right-padded in the batch), first position dropped."""
    width = max(len(s) for s in batch)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in batch])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch])
    caught: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        caught.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    handle = model.model.layers[LAYER].register_forward_hook(hook)
    try:
        model(input_ids=ids, attention_mask=mask)
    except _Stop:
        pass
    finally:
        handle.remove()
    return [caught[0][i, 1 : len(s)].float().clone() for i, s in enumerate(batch)]


def activations(model: torch.nn.Module, seqs: list[list[int]], pad: int) -> torch.Tensor:
    """resid_post.LAYER of every position but the first of every sequence, [n, D_IN]."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # little padding per batch
    chunks = []
    for start in range(0, len(order), 32):
        chunks += resid(model, [seqs[i] for i in order[start : start + 32]], pad)
    return torch.cat(chunks)


def packed(docs: list[list[int]], rng: random.Random, sep: list[int]) -> list[list[int]]:
    """The documents shuffled, joined by ``sep`` and cut into WINDOW-token windows."""
    docs = docs[:]
    rng.shuffle(docs)
    stream = [t for d in docs for t in [*d, *sep]]
    return [stream[i : i + WINDOW] for i in range(0, len(stream) - WINDOW + 1, WINDOW)]


class SAE(torch.nn.Module):
    """A standard ReLU SAE (SAELens's 'standard' architecture, b_dec subtracted on input)."""

    def __init__(self, b_dec: torch.Tensor, gen: torch.Generator):
        super().__init__()
        w = torch.randn(D_SAE, D_IN, generator=gen)
        w = 0.1 * w / w.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w)
        self.W_enc = torch.nn.Parameter(w.t().clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(D_SAE))
        self.b_dec = torch.nn.Parameter(b_dec.clone())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def loss(self, x: torch.Tensor, l1: float) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        mse = (self.decode(f) - x).pow(2).sum(-1).mean()
        sparsity = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        return mse + l1 * sparsity, mse


def train(acts: torch.Tensor) -> SAE:
    """STEPS Adam steps on random BATCH-row batches of ``acts``; L1 warms up, the LR decays."""
    gen = torch.Generator().manual_seed(SEED)
    sae = SAE(acts.mean(0), gen)
    opt = torch.optim.Adam(sae.parameters(), lr=LR)
    scale = acts.pow(2).sum(-1).mean()  # L1_COEFF is relative to the activations' mean square
    decay_start = int(STEPS * (1 - LR_DECAY))
    for step in range(STEPS):
        l1 = L1_COEFF * min(1.0, step / (L1_WARMUP * STEPS)) * scale.sqrt()
        lr = LR * min(1.0, (STEPS - step) / (STEPS - decay_start))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(acts), (BATCH,), generator=gen)
        loss, mse = sae.loss(acts[idx], float(l1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == STEPS - 1:
            print(f"  step {step:5d}  loss/ms {loss / scale:.4f}  mse/ms {mse / scale:.4f}")
    return sae


def fve(sae: SAE, acts: torch.Tensor) -> float:
    """Fraction of variance explained: 1 - squared error / squared distance to the mean."""
    err = (sae.decode(sae.encode(acts)) - acts).pow(2).sum()
    return float(1 - err / (acts - acts.mean(0)).pow(2).sum())


@torch.no_grad()
def evaluate(sae: SAE, acts: torch.Tensor) -> dict[str, float]:
    """FVE (over all positions, and over those with a norm under 3x the median), mean L0 and
    the fraction of latents that never fire on ``acts``."""
    norms = acts.norm(dim=-1)
    active = sae.encode(acts) > 0
    return {
        "fve": fve(sae, acts),
        "fve_typical_norm": fve(sae, acts[norms < 3 * norms.median()]),
        "l0": float(active.float().sum(-1).mean()),
        "dead_fraction": float((active.sum(0) == 0).float().mean()),
    }


def save(sae: SAE, out: Path, metadata: dict) -> None:
    """SAELens's folder format: cfg.json and sae_weights.safetensors."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
    weights = out / "sae_weights.safetensors"
    save_file(tensors, str(weights))
    weights.chmod(0o644)  # safetensors writes it private
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "hook_name": f"blocks.{LAYER}.hook_resid_post",
        "hook_layer": LAYER,
        "model_name": MODEL_ID,
        "context_size": WINDOW,
        "prepend_bos": False,
        "metadata": metadata,
    }
    (out / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder ({OUT})")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    t0 = time.time()
    loaded = load_model(MODEL_ID, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    eos = int(model.generation_config.eos_token_id)
    print(f"sampling text from {len(seed_prompts())} seed prompts")
    docs = generate(model, [tok.encode(p) for p in seed_prompts()], eos)
    docs += [tok.encode(t) for t in jsonl_texts()]
    held = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    kept = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    rng = random.Random(SEED)
    seqs = kept + [w for _ in range(PACKINGS) for w in packed(kept, rng, tok.encode("\n\n"))]
    print(f"{len(docs)} documents, {sum(map(len, docs))} tokens; reading resid_post.{LAYER}")
    train_acts = activations(model, seqs, eos)
    test_acts = activations(model, held, eos)
    print(f"{len(train_acts)} training and {len(test_acts)} held-out activations")
    t1 = time.time()
    sae = train(train_acts)
    t2 = time.time()
    stats = evaluate(sae, test_acts)
    print("held out: " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
    metadata = {
        "trained_by": "specs/data/train_sae.py",
        "hook": f"output of model.model.layers[{LAYER}] (resid_post.{LAYER})",
        "train_activations": len(train_acts),
        "heldout_activations": len(test_acts),
        "documents": len(docs),
        "steps": STEPS,
        "batch": BATCH,
        "l1_coefficient": L1_COEFF,
        "seed": SEED,
        "heldout": {k: round(v, 4) for k, v in stats.items()},
    }
    save(sae, args.out, metadata)
    print(f"data {t1 - t0:.0f} s, training {t2 - t1:.0f} s; saved to {args.out}")


if __name__ == "__main__":
    main()

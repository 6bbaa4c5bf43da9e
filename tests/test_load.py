"""Tests of the strict spec loader (specsight.load)."""

from __future__ import annotations

import hashlib
import json
import math
import time

import pytest

from specsight.errors import Issue, SpecError
from specsight.spec import MAX_BYTES, MAX_DEPTH, SourceMap, from_data, load_file, load_text

SPEC = """\
model: gpt2  # a comment
invokes:
  corrupt:
    prompt: "The Eiffel Tower is in"
    ops:
      - site: resid_post.5
        scale: 1e-3
"""

SITE = ("invokes", "corrupt", "ops", 0, "site")


def issues_of(text: str, **kwargs) -> tuple[Issue, ...]:
    with pytest.raises(SpecError) as info:
        load_text(text, **kwargs)
    return info.value.issues


def only_issue(text: str, **kwargs) -> Issue:
    issues = issues_of(text, **kwargs)
    assert len(issues) == 1, issues
    return issues[0]


def where(issue: Issue) -> tuple[str, int | None, int | None]:
    return issue.code, issue.line, issue.col


# ----------------------------------------------------------------------------- data and positions


def test_yaml_data_is_plain_python():
    doc = load_text(SPEC, file="spec.yaml")
    assert doc.data == {
        "model": "gpt2",
        "invokes": {
            "corrupt": {
                "prompt": "The Eiffel Tower is in",
                "ops": [{"site": "resid_post.5", "scale": 0.001}],
            }
        },
    }
    assert doc.file == "spec.yaml" and doc.base_dir is None
    assert doc.sha256 == hashlib.sha256(SPEC.encode()).hexdigest()


def test_positions_of_nested_values_and_keys():
    source = load_text(SPEC).source
    assert source.locate(SITE) == (6, 15)
    assert source.locate(SITE, key=True) == (6, 9)
    assert source.locate(("invokes", "corrupt", "ops")) == (6, 7)
    assert source.locate(("invokes", "corrupt", "ops"), key=True) == (5, 5)
    assert source.locate(("invokes", "corrupt", "ops", 0)) == (6, 9)
    assert source.locate(("invokes", "corrupt", "prompt")) == (4, 13)
    assert source.locate(("model",)) == (1, 8)
    assert source.locate(()) == (1, 1)


def test_locate_falls_back_to_nearest_ancestor():
    source = load_text(SPEC).source
    assert source.locate((*SITE[:-1], "missing")) == (6, 9)
    assert source.locate((*SITE[:-1], "missing"), key=True) == (6, 9)
    assert source.locate(("invokes", "corrupt", "ops", 5, "site")) == (6, 7)
    assert source.locate(("nothing", "here")) == (1, 1)
    # an item has no key: key=True falls back to the value
    assert source.locate(("invokes", "corrupt", "ops", 0), key=True) == (6, 9)
    assert SourceMap(None).locate(("a",)) == (None, None)


def test_source_map_builds_located_issues():
    source = load_text(SPEC, file="spec.yaml").source
    issue = source.issue("unknown-site", "no such site", list(SITE), hint="try resid_post")
    assert issue == Issue(
        "unknown-site", "no such site", SITE, "spec.yaml", 6, 15, "try resid_post"
    )
    assert where(source.issue("unknown-key", "x", SITE, key=True)) == ("unknown-key", 6, 9)
    assert where(SourceMap("f.yaml").issue("c", "m", ("a",))) == ("c", None, None)


def test_crlf_line_breaks_keep_positions():
    source = load_text("a: 1\r\nb: two\r\n").source
    assert source.locate(("b",)) == (2, 4)


# ----------------------------------------------------------------------------- YAML 1.2 scalars


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1e-3", 0.001),
        ("1.5", 1.5),
        ("-2.", -2.0),
        (".5", 0.5),
        ("10", 10),
        ("-7", -7),
        ("+12", 12),
        ("0x10", 16),
        ("0o17", 15),
        ("yes", "yes"),
        ("no", "no"),
        ("on", "on"),
        ("off", "off"),
        ("true", True),
        ("False", False),
        ("TRUE", True),
        ("~", None),
        ("null", None),
        ("NULL", None),
        ("", None),
        ('"5"', "5"),
        ("'true'", "true"),
        ('"null"', "null"),
        (".inf", math.inf),
        ("-.Inf", -math.inf),
        ("+.INF", math.inf),
        ("2024-01-01", "2024-01-01"),
        ("1_000", "1_000"),
        ("0b101", "0b101"),
        ("12:30", "12:30"),
        ("!!str 5", "5"),
        ("!!str true", "true"),
        ("!!float 1", 1.0),
        ("!!int '7'", 7),
        ("!!bool 'false'", False),
        ("!!null ''", None),
        ("! 5", "5"),
        ("|\n  5", "5\n"),
    ],
)
def test_plain_scalars_follow_yaml_core_schema(text, expected):
    value = load_text(f"v: {text}\n").data["v"]
    assert value == expected
    assert type(value) is type(expected)


def test_nan_resolves_to_float_nan():
    assert math.isnan(load_text("v: .nan\n").data["v"])
    assert math.isnan(load_text("v: !!float .NaN\n").data["v"])


def test_keys_are_always_strings():
    assert load_text("5: x\ntrue: y\nnull: z\n'q': w\n").data == {
        "5": "x",
        "true": "y",
        "null": "z",
        "q": "w",
    }


@pytest.mark.parametrize(
    ("text", "line", "col"),
    [("? [a, b]\n: 1\n", 1, 3), ("k: {[1]: 2}\n", 1, 5), ("x: 1\n? {k: v}\n: 2\n", 2, 3)],
)
def test_complex_keys_are_rejected(text, line, col):
    assert where(only_issue(text)) == ("bad-key", line, col)


def test_explicitly_tagged_non_string_key_is_rejected():
    assert where(only_issue("a: 1\n!!int 5: x\n")) == ("bad-key", 2, 1)


@pytest.mark.parametrize(
    "text", ["v: !!int abc\n", "v: !!bool yes\n", "v: !!float 0x10\n", "v: !!null 0\n"]
)
def test_value_not_fitting_its_tag_is_rejected(text):
    issue = only_issue(text)
    assert where(issue) == ("bad-value", 1, 4)
    assert issue.path == ("v",)


def test_collection_with_wrong_standard_tag_is_rejected():
    issues = issues_of("a: !!seq {k: 1}\nb: !!map 5\n")
    assert [where(i) for i in issues] == [("bad-value", 1, 4), ("bad-value", 2, 4)]


def test_integer_too_long_for_python_is_a_bad_value():
    assert where(only_issue("v: " + "9" * 5000 + "\n")) == ("bad-value", 1, 4)


# ----------------------------------------------------------------------------- YAML rejections


def test_duplicate_keys_are_all_reported_at_second_occurrence():
    text = "a: 1\nb:\n  c: 1\n  c: 2\na: 3\n"
    issues = issues_of(text, file="spec.yaml")
    assert [where(i) for i in issues] == [("duplicate-key", 4, 3), ("duplicate-key", 5, 1)]
    assert issues[0].path == ("b", "c") and "line 3" in issues[0].hint
    assert issues[1].path == ("a",) and "line 1" in issues[1].hint
    assert all(i.file == "spec.yaml" for i in issues)


def test_duplicate_keys_in_flow_mapping():
    issue = only_issue("m: {x: 1, y: 2, x: 3}\n")
    assert where(issue) == ("duplicate-key", 1, 17)
    assert issue.path == ("m", "x")


def test_anchor_is_rejected():
    issue = only_issue("base: &b {x: 1}\nother: *b\n")
    assert where(issue) == ("alias", 1, 7)
    assert issue.path == ("base",)
    assert "anchors and aliases" in issue.message and issue.hint == "write the value out in full"


def test_alias_is_rejected():
    issue = only_issue("a: 1\nb: *nowhere\n")
    assert where(issue) == ("alias", 2, 4)
    assert issue.path == ("b",)


def test_billion_laughs_is_rejected_fast():
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    start = time.perf_counter()
    issue = only_issue("\n".join(lines) + "\n")
    assert time.perf_counter() - start < 0.5
    assert where(issue) == ("alias", 1, 4)


def test_python_object_tag_is_rejected():
    issue = only_issue("cmd: !!python/object/apply:os.system [echo hi]\n")
    assert where(issue) == ("custom-tag", 1, 6)
    assert "!!python/object/apply:os.system" in issue.message
    assert issue.path == ("cmd",)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("x: !custom 1\n", "!custom"),
        ("x: !!timestamp 2024-01-01\n", "!!timestamp"),
        ("x: !!binary aGk=\n", "!!binary"),
        ("x: !thing {a: 1}\n", "!thing"),
    ],
)
def test_custom_tags_are_rejected(text, shown):
    issue = only_issue(text)
    assert where(issue) == ("custom-tag", 1, 4)
    assert shown in issue.message


def test_multiple_documents_are_rejected():
    assert where(only_issue("a: 1\n---\nb: 2\n")) == ("multiple-documents", 2, 1)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "~\n"])
def test_empty_document_is_rejected(text):
    assert only_issue(text).code == "empty"


@pytest.mark.parametrize(
    ("text", "kind"), [("- a\n- b\n", "a list"), ("just text\n", "a string"), ("42\n", "a number")]
)
def test_top_level_must_be_a_mapping(text, kind):
    issue = only_issue(text)
    assert where(issue) == ("not-a-mapping", 1, 1)
    assert kind in issue.message


@pytest.mark.parametrize(
    ("text", "line", "col", "words"),
    [
        ("a: b: c\n", 1, 5, "mapping values are not allowed"),
        ("a: [1, 2\nb: 3\n", 2, 2, "expected ','"),
        ("a: 1\n  b: 2\n", 2, 4, "mapping values are not allowed"),
        ("a: \x00\n", 1, 4, "special characters"),
    ],
)
def test_yaml_syntax_errors_are_located(text, line, col, words):
    issue = only_issue(text)
    assert where(issue) == ("yaml-syntax", line, col)
    assert words in issue.message


# ----------------------------------------------------------------------------- size and depth


def test_too_large_text_is_rejected_before_parsing():
    issue = only_issue("[" * (MAX_BYTES + 1))  # would be a syntax error if parsed
    assert issue.code == "too-large"
    assert "1,000,001" in issue.message and "1,000,000" in issue.message


def test_text_at_the_limit_is_accepted():
    text = '{"a": "' + "x" * (MAX_BYTES - 9) + '"}'
    assert len(text.encode()) == MAX_BYTES
    assert len(load_text(text).data["a"]) == MAX_BYTES - 9


def test_too_large_file_is_rejected(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"a: " + b"x" * MAX_BYTES)
    with pytest.raises(SpecError) as info:
        load_file(path)
    (issue,) = info.value.issues
    assert issue.code == "too-large" and issue.file == str(path)
    assert "1,000,003" in issue.message


def _nested_flow(levels: int) -> str:
    return "v: " + "[" * levels + "]" * levels + "\n"


def _nested_block(levels: int) -> str:
    lines = [" " * i + "k:" for i in range(levels - 1)] + [" " * (levels - 1) + "k: 1"]
    return "\n".join(lines) + "\n"


def test_flow_nesting_at_the_limit_is_accepted():
    value = load_text(_nested_flow(MAX_DEPTH - 1)).data["v"]
    for _ in range(MAX_DEPTH - 2):
        value = value[0]
    assert value == []


def test_flow_nesting_over_the_limit_is_rejected():
    issue = only_issue(_nested_flow(MAX_DEPTH))  # the top mapping is level 1
    assert where(issue) == ("too-deep", 1, 3 + MAX_DEPTH)
    assert issue.path == ("v",) + (0,) * (MAX_DEPTH - 1)


def test_block_nesting_at_the_limit_is_accepted():
    data = load_text(_nested_block(MAX_DEPTH)).data
    for _ in range(MAX_DEPTH - 1):
        data = data["k"]
    assert data == {"k": 1}


def test_block_nesting_over_the_limit_is_rejected():
    issue = only_issue(_nested_block(MAX_DEPTH + 1))
    assert where(issue) == ("too-deep", MAX_DEPTH + 1, MAX_DEPTH + 1)


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_very_deep_nesting_is_rejected_without_recursion(fmt):
    start = time.perf_counter()
    issue = only_issue("[" * 100_000, fmt=fmt)
    assert time.perf_counter() - start < 1.5
    assert where(issue) == ("too-deep", 1, MAX_DEPTH + 1)


# ----------------------------------------------------------------------------- JSON


JSON_SPEC = (
    '{\n  "invokes": {"corrupt": {"ops": [{"site": "resid_post.5"}]}},\n  "n": [1, 2.5, null]\n}'
)


def test_json_data_and_positions():
    doc = load_text(JSON_SPEC, fmt="json")
    assert doc.data == {
        "invokes": {"corrupt": {"ops": [{"site": "resid_post.5"}]}},
        "n": [1, 2.5, None],
    }
    assert doc.source.locate(SITE) == (2, 44)
    assert doc.source.locate(SITE, key=True) == (2, 36)
    assert doc.source.locate(("n", 2)) == (3, 17)
    assert doc.source.locate(("n",), key=True) == (3, 3)
    assert doc.source.locate(("n", 7)) == (3, 8)


def test_json_with_tabs_keeps_positions():
    source = load_text('{\n\t"a": {\n\t\t"b": 1\n\t}\n}', fmt="json").source
    assert source.locate(("a", "b")) == (3, 8)


def test_json_duplicate_keys_are_located():
    issues = issues_of('{\n  "a": 1,\n  "o": {"x": 1, "x": 2},\n  "a": 2\n}', fmt="json")
    assert [where(i) for i in issues] == [("duplicate-key", 3, 17), ("duplicate-key", 4, 3)]
    assert issues[0].path == ("o", "x") and "line 3" in issues[0].hint
    assert issues[1].path == ("a",) and "line 2" in issues[1].hint


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_json_nan_and_infinity_are_rejected(literal):
    issue = only_issue('{"a": [1, ' + literal + "]}", fmt="json")
    assert where(issue) == ("bad-value", 1, 11)
    assert issue.path == ("a", 1)


def test_json_nan_inside_a_string_is_fine():
    assert load_text('{"a": "NaN"}', fmt="json").data == {"a": "NaN"}


def test_json_syntax_error_is_located():
    issue = only_issue('{"a": 1,\n "b": }', fmt="json")
    assert where(issue) == ("json-syntax", 2, 7)
    assert "Expecting value" in issue.message


def test_json_depth_is_checked_before_parsing():
    text = '{"v": ' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}"
    issue = only_issue(text, fmt="json")
    assert where(issue) == ("too-deep", 1, 6 + MAX_DEPTH)
    ok = '{"v": ' + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "}"
    assert load_text(ok, fmt="json").data == json.loads(ok)


@pytest.mark.parametrize(("text", "code"), [("  \n", "empty"), ("[1]", "not-a-mapping")])
def test_json_empty_and_not_a_mapping(text, code):
    assert only_issue(text, fmt="json").code == code


def test_format_is_sniffed_for_text():
    assert load_text('{"a": 1}').data == {"a": 1}
    assert load_text("a: 1").data == {"a": 1}
    # the sniffed JSON parser is strict: a duplicate is still caught
    assert only_issue('{"a": 1, "a": 2}').code == "duplicate-key"


# ----------------------------------------------------------------------------- files


def test_load_file_yaml(tmp_path):
    path = tmp_path / "spec.yaml"
    raw = SPEC.encode()
    path.write_bytes(raw)
    doc = load_file(path)
    assert doc.data["model"] == "gpt2"
    assert doc.file == str(path) and doc.source.file == str(path)
    assert doc.base_dir == str(tmp_path)
    assert doc.sha256 == hashlib.sha256(raw).hexdigest()


def test_load_file_issue_names_the_file(tmp_path):
    path = tmp_path / "spec.yml"
    path.write_text("a: 1\na: 2\n")
    with pytest.raises(SpecError) as info:
        load_file(str(path))
    assert info.value.issues[0].file == str(path)
    assert info.value.issues[0].location == f"{path}:2:1"


def test_load_file_json_by_extension(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text('{"a": 1,\n "a": 2}')
    with pytest.raises(SpecError) as info:
        load_file(path)
    assert [where(i) for i in info.value.issues] == [("duplicate-key", 2, 2)]


@pytest.mark.parametrize(
    ("content", "expected"), [('{"a": [1]}', {"a": [1]}), ("a: [1]", {"a": [1]})]
)
def test_load_file_sniffs_other_extensions(tmp_path, content, expected):
    path = tmp_path / "spec.txt"
    path.write_text(content)
    assert load_file(path).data == expected


def test_file_not_found_suggests_a_close_name(tmp_path):
    (tmp_path / "patching.yaml").write_text("a: 1\n")
    missing = tmp_path / "patchng.yaml"
    with pytest.raises(SpecError) as info:
        load_file(missing)
    (issue,) = info.value.issues
    assert issue.code == "file-not-found" and issue.line is None
    assert str(missing) in issue.message
    assert "patching.yaml" in issue.hint


def test_file_not_found_in_missing_folder(tmp_path):
    with pytest.raises(SpecError) as info:
        load_file(tmp_path / "nope" / "spec.yaml")
    assert info.value.issues[0].code == "file-not-found"


def test_directory_is_not_a_spec_file(tmp_path):
    with pytest.raises(SpecError) as info:
        load_file(tmp_path)
    assert info.value.issues[0].code == "file-not-found"


def test_file_not_utf8_is_located(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"a: 1\nb: caf\xe9\n")
    with pytest.raises(SpecError) as info:
        load_file(path)
    assert where(info.value.issues[0]) == ("encoding", 2, 7)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "spec.json"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}')
    assert load_file(path).data == {"a": 1}


# ----------------------------------------------------------------------------- from_data


def test_from_data_copies_and_hashes():
    data = {"b": [1, {"c": "x"}], "a": 1.5}
    doc = from_data(data, file="<notebook>")
    assert doc.data == data and doc.data is not data and doc.data["b"] is not data["b"]
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    assert doc.sha256 == hashlib.sha256(canonical.encode()).hexdigest()
    assert doc.file == "<notebook>" and doc.base_dir is None
    assert doc.source.locate(("b", 1, "c")) == (None, None)
    assert from_data({"a": 1.5, "b": [1, {"c": "x"}]}).sha256 == doc.sha256


def test_from_data_rejects_non_string_keys():
    with pytest.raises(SpecError) as info:
        from_data({"ops": [{1: "x", "ok": 1}], "flag": {None: 2}})
    issues = sorted(info.value.issues, key=lambda i: str(i.path))
    assert [(i.code, i.path) for i in issues] == [
        ("bad-key", ("flag",)),
        ("bad-key", ("ops", 0)),
    ]


def test_from_data_rejects_non_mapping():
    with pytest.raises(SpecError) as info:
        from_data([1, 2])  # type: ignore[arg-type]
    assert info.value.issues[0].code == "not-a-mapping"


def test_from_data_depth_limit():
    def nested(levels: int) -> dict:
        data: dict = {"k": 1}
        for _ in range(levels - 1):
            data = {"k": data}
        return data

    assert from_data(nested(MAX_DEPTH)).data == nested(MAX_DEPTH)
    with pytest.raises(SpecError) as info:
        from_data(nested(MAX_DEPTH + 1))
    assert info.value.issues[0].code == "too-deep"


def test_from_data_rejects_cycles_as_too_deep():
    data: dict = {"a": []}
    data["a"].append(data)
    with pytest.raises(SpecError) as info:
        from_data(data)
    assert info.value.issues[0].code == "too-deep"

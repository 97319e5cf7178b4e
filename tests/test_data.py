"""Dataset layer: source adapters, registry, loading (embedded, local, hub cache) and the probe set. Offline."""

import hashlib
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tune_lfm.data import loading
from tune_lfm.data.loading import DatasetUnavailable, embedded_conversations, load_dataset_split
from tune_lfm.data.probe import PROBE_FILE, PROBE_VERSION, load_probe, probe_fingerprint
from tune_lfm.data.registry import DATASETS, DatasetSpec, resolve_dataset
from tune_lfm.data.sources import SOURCE_FORMATS, MalformedRow

STUDY = ["smol-magpie-ultra", "ultrachat", "finetome", "magicoder", "tulu3", "openhermes", "slimorca", "gsm8k",
         "dolly", "alpaca"]


def embedded_rows(name):
    path = loading.EMBEDDED_DIR / DATASETS[name].embedded
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path, rows, extra_lines=()):
    lines = [json.dumps(row) for row in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def gsm8k_row(i):
    return {"question": f"Tom has {i} apples and buys 3 more. How many now?",
            "answer": f"He has {i} + 3 = <<{i}+3={i + 3}>>{i + 3} apples.\n#### {i + 3}"}


# --- adapters on the embedded rows -------------------------------------------------------------------------------

def expected_turns(source_format, row):
    """(role, text that must appear in that turn) per turn, read straight from the source fields."""
    if source_format == "messages":
        turns = [(m["role"], m["content"]) for m in row["messages"]]
    elif source_format == "sharegpt":
        roles = {"human": "user", "gpt": "assistant", "system": "system"}
        turns = [(roles[t["from"]], t["value"]) for t in row["conversations"]]
    elif source_format == "magicoder":
        turns = [("user", row["problem"]), ("assistant", row["solution"])]
    elif source_format == "gsm8k":
        reasoning, final = row["answer"].split("####")
        turns = [("user", row["question"]), ("assistant", reasoning.strip()),
                 ("assistant", f"The final answer is {final.strip()}.")]
    elif source_format == "dolly":
        turns = [("user", row["instruction"]), ("user", row["context"] or ""), ("assistant", row["response"])]
    else:
        turns = [("user", row["instruction"]), ("user", row["input"] or ""), ("assistant", row["output"])]
    turns = [(role, text) for role, text in turns if not (role == "system" and not text.strip())]
    while turns[-1][0] == "user":
        turns.pop()
    return turns


@pytest.mark.parametrize("name", STUDY)
def test_adapter_keeps_every_embedded_row(name):
    rows = embedded_rows(name)
    adapt = SOURCE_FORMATS[DATASETS[name].source_format]
    for number, row in enumerate(rows, start=1):
        messages = adapt(row)
        expected = expected_turns(DATASETS[name].source_format, row)
        if DATASETS[name].source_format in ("messages", "sharegpt"):
            assert [(m["role"], m["content"]) for m in messages] == expected, f"{name} row {number}"
        else:
            assert [m["role"] for m in messages] == ["user", "assistant"], f"{name} row {number}"
            by_role = {m["role"]: m["content"] for m in messages}
            assert by_role["user"].startswith(expected[0][1]), f"{name} row {number}"
            for role, text in expected:
                assert text in by_role[role], f"{name} row {number}: {role} lost {text[:40]!r}"
        assert messages[-1]["role"] == "assistant"


@pytest.mark.parametrize("name", STUDY)
def test_first_embedded_row_keeps_user_text(name):
    row = embedded_rows(name)[0]
    messages = SOURCE_FORMATS[DATASETS[name].source_format](row)
    user = next(m["content"] for m in messages if m["role"] == "user")
    source_user = {
        "messages": lambda: next(m["content"] for m in row.get("messages", []) if m["role"] == "user"),
        "sharegpt": lambda: next(t["value"] for t in row.get("conversations", []) if t["from"] == "human"),
        "magicoder": lambda: row["problem"],
        "gsm8k": lambda: row["question"],
        "dolly": lambda: row["instruction"] if not row["context"] else f"{row['instruction']}\n\n{row['context']}",
        "alpaca": lambda: row["instruction"] if not row["input"] else f"{row['instruction']}\n\n{row['input']}",
    }[DATASETS[name].source_format]()
    assert user == source_user


# --- adapters on hand-written rows -------------------------------------------------------------------------------

def test_gsm8k_keeps_reasoning_and_final_answer():
    messages = SOURCE_FORMATS["gsm8k"](gsm8k_row(4))
    assert messages == [
        {"role": "user", "content": "Tom has 4 apples and buys 3 more. How many now?"},
        {"role": "assistant", "content": "He has 4 + 3 = <<4+3=7>>7 apples.\nThe final answer is 7."},
    ]


@pytest.mark.parametrize(("source_format", "row", "user"), [
    ("dolly", {"instruction": "Summarize.", "context": "Some text.", "response": "Short.", "category": "summ"},
     "Summarize.\n\nSome text."),
    ("dolly", {"instruction": "Name a color.", "context": "", "response": "Red.", "category": "brainstorming"},
     "Name a color."),
    ("alpaca", {"instruction": "Translate.", "input": "Bonjour", "output": "Hello", "text": "ignored"},
     "Translate.\n\nBonjour"),
    ("alpaca", {"instruction": "Give a tip.", "input": None, "output": "Sleep well.", "text": ""}, "Give a tip."),
    ("magicoder", {"problem": "Write f.", "solution": "def f(): pass", "lang": "python", "seed": "x"}, "Write f."),
])
def test_flat_formats_fold_optional_field_into_user_turn(source_format, row, user):
    messages = SOURCE_FORMATS[source_format](row)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == user


def test_sharegpt_maps_roles_keeps_order_and_ignores_weight():
    row = {"conversations": [
        {"from": "system", "value": "Be brief.", "weight": None},
        {"from": "human", "value": "Hi", "weight": 0.0},
        {"from": "gpt", "value": "Hello!", "weight": 1.0},
        {"from": "human", "value": "Bye", "weight": 0.0},
        {"from": "gpt", "value": "Goodbye!", "weight": 1.0},
    ]}
    assert SOURCE_FORMATS["sharegpt"](row) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye!"},
    ]


def test_empty_system_and_trailing_user_turns_are_dropped():
    row = {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Q"},
                        {"role": "assistant", "content": "A"}, {"role": "user", "content": "unanswered"}]}
    assert SOURCE_FORMATS["messages"](row) == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


MALFORMED = [
    ("messages", "not a dict", "row is not an object"),
    ("messages", {"prompt": "x"}, "missing key 'messages'"),
    ("messages", {"messages": []}, "non-empty list"),
    ("messages", {"messages": "user: hi"}, "non-empty list"),
    ("messages", {"messages": [{"role": "user", "content": "Q"}, {"role": "tool", "content": "A"}]}, "unknown role"),
    ("messages", {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": 3}]}, "not a string"),
    ("messages", {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  "}]}, "empty"),
    ("messages", {"messages": [{"role": "user", "content": "Q"}]}, "no assistant turn"),
    ("messages", {"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"},
                               {"role": "assistant", "content": "B"}]}, "first turn"),
    ("messages", {"messages": [{"role": "user", "content": "Q"}, {"role": "system", "content": "S"},
                               {"role": "assistant", "content": "A"}]}, "system turn after"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]}, "unknown role"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt"}]}, "not a string"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Q"}, {"from": "human", "value": "R"}]},
     "no assistant turn"),
    ("magicoder", {"problem": "Write f."}, "missing key 'solution'"),
    ("magicoder", {"problem": ["Write f."], "solution": "x"}, "not a string"),
    ("gsm8k", {"question": "2+2?", "answer": "It is 4."}, "'####'"),
    ("gsm8k", {"question": "2+2?", "answer": "It is 4.\n####   "}, "empty final answer"),
    ("gsm8k", {"question": "", "answer": "4\n#### 4"}, "empty 'question'"),
    ("dolly", {"instruction": "Do it.", "context": 5, "response": "Done."}, "'context' is not a string"),
    ("dolly", {"instruction": "Do it.", "context": ""}, "missing key 'response'"),
    ("alpaca", {"instruction": "Do it.", "input": "", "output": None}, "'output' is not a string"),
]


@pytest.mark.parametrize(("source_format", "row", "reason"), MALFORMED)
def test_malformed_rows_raise_with_reason(source_format, row, reason):
    with pytest.raises(MalformedRow, match=reason):
        SOURCE_FORMATS[source_format](row)


# --- registry ----------------------------------------------------------------------------------------------------

def test_registry_holds_the_ten_study_datasets():
    assert sorted(DATASETS) == sorted(STUDY)
    assert DATASETS["smol-magpie-ultra"].hub_config == "smol-magpie-ultra"
    assert DATASETS["ultrachat"].split == "train_sft"
    assert DATASETS["gsm8k"].hub_config == "main"
    assert DATASETS["openhermes"].revision == "refs/convert/parquet"
    for spec in DATASETS.values():
        assert spec.source_format in SOURCE_FORMATS
        assert spec.embedded == f"{spec.name}.jsonl"


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'nope'") as err:
        resolve_dataset("nope", {"mine": {"path": "x.jsonl", "format": "alpaca"}})
    assert all(name in str(err.value) for name in STUDY + ["mine"])


@pytest.mark.parametrize(("entry", "message"), [
    ({"path": "d.jsonl", "format": "chatml"}, "unknown format 'chatml'; allowed formats: \\['alpaca', 'dolly'"),
    ({"path": "d.jsonl", "format": "alpaca", "splitt": "x"}, "unknown key\\(s\\) \\['splitt'\\]"),
    ({"path": "d.jsonl", "hub_id": "a/b", "format": "alpaca"}, "either 'hub_id' or 'path'"),
    ({"path": "d.csv", "format": "alpaca"}, "must end with one of"),
    ({"path": "d.jsonl"}, "missing format"),
    ({"format": "alpaca"}, "missing hub_id or path"),
    ({"hub_id": 3, "format": "alpaca"}, "'hub_id' must be a non-empty string"),
    ("a/b", "expected a mapping"),
])
def test_user_dataset_errors_say_what_is_wrong(entry, message):
    with pytest.raises(ValueError, match=message):
        resolve_dataset("mine", {"mine": entry})


def test_user_entry_overrides_study_dataset_and_inherits_format(tmp_path):
    spec = resolve_dataset("gsm8k", {"gsm8k": {"path": str(tmp_path / "g.parquet")}})
    assert spec.source_format == "gsm8k" and spec.path == str(tmp_path / "g.parquet")
    assert resolve_dataset("gsm8k") is DATASETS["gsm8k"]


# --- loading -----------------------------------------------------------------------------------------------------

def test_user_local_jsonl_loads_and_counts_malformed_rows(tmp_path):
    rows = [gsm8k_row(i) for i in range(30)]
    rows[3] = {"question": "no answer"}
    rows[25] = {"question": "x", "answer": "no marker"}
    path = write_jsonl(tmp_path / "mine.jsonl", rows, extra_lines=["{not json"])
    spec = resolve_dataset("mine", {"mine": {"path": str(path), "format": "gsm8k"}})
    data = load_dataset_split(spec, num_train=10, num_eval=5, embedded=False)
    assert data.source == f"path:{path}"
    assert (len(data.train), len(data.eval)) == (10, 5)
    assert data.rows_seen == 31 and data.rows_skipped == 3
    assert data.skip_reasons == {"missing key 'answer'": 1, "answer has no '####' final answer": 1,
                                 "invalid JSON line": 1}
    assert [c[0]["content"] for c in data.eval] == [gsm8k_row(i)["question"] for i in (0, 1, 2, 4, 5)]
    held_out = {c[0]["content"] for c in data.eval}
    assert not held_out & {c[0]["content"] for c in data.train}


def test_user_local_parquet_loads(tmp_path):
    rows = [{"instruction": f"Say {i}.", "input": None if i % 2 else "loudly", "output": f"{i}!", "text": ""}
            for i in range(12)]
    path = tmp_path / "mine.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    spec = resolve_dataset("mine", {"mine": {"path": str(path), "format": "alpaca"}})
    data = load_dataset_split(spec, num_train=100, num_eval=2, embedded=False)
    assert (len(data.train), len(data.eval), data.rows_skipped) == (10, 2, 0)
    assert data.eval[0] == [{"role": "user", "content": "Say 0.\n\nloudly"}, {"role": "assistant", "content": "0!"}]


def test_missing_local_file_names_dataset_and_path(tmp_path):
    spec = resolve_dataset("mine", {"mine": {"path": str(tmp_path / "gone.jsonl"), "format": "alpaca"}})
    with pytest.raises(FileNotFoundError, match="dataset 'mine'.*gone.jsonl"):
        load_dataset_split(spec, 1, 1, embedded=False)


def test_seed_picks_training_rows_but_never_the_held_out_block(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [gsm8k_row(i) for i in range(60)])
    spec = DatasetSpec(name="g", source_format="gsm8k", path=str(path))
    first, again, other, bigger = (load_dataset_split(spec, n, 5, embedded=False, seed=s)
                                   for n, s in ((20, 0), (20, 0), (20, 1), (40, 0)))
    assert first.train == again.train and first.train != other.train
    assert first.eval == other.eval == bigger.eval
    assert len({json.dumps(c) for c in first.train}) == 20


def test_user_dataset_without_embedded_rows_is_refused_at_tiny_scale():
    spec = resolve_dataset("mine", {"mine": {"hub_id": "me/mine", "format": "alpaca"}})
    with pytest.raises(ValueError, match="'mine' has no embedded rows"):
        load_dataset_split(spec, 1, 1, embedded=True)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """Serve local jsonl files through the real streaming loader in place of the hub, counting calls."""
    train = write_jsonl(tmp_path / "train.jsonl", [gsm8k_row(i) for i in range(40)] + [{"question": "bad"}])
    test = write_jsonl(tmp_path / "test.jsonl", [gsm8k_row(100 + i) for i in range(10)])
    real_load = datasets.load_dataset
    calls = []

    def load_from_files(hub_id, config=None, *, revision=None, streaming=False):
        calls.append((hub_id, config, revision, streaming))
        return real_load("json", data_files={"train": str(train), "test": str(test)}, streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", load_from_files)
    return calls


def test_hub_subset_is_cached_and_second_call_stays_offline(fake_hub, tmp_path):
    spec = DATASETS["gsm8k"]
    first = load_dataset_split(spec, 50, 4, embedded=False, cache_dir=str(tmp_path / "cache"))
    assert fake_hub == [("openai/gsm8k", "main", None, True)]
    assert first.source == "hub:openai/gsm8k"
    assert (len(first.train), len(first.eval), first.rows_skipped) == (40, 4, 1)
    assert first.eval[0][0]["content"] == gsm8k_row(100)["question"]
    second = load_dataset_split(spec, 50, 4, embedded=False, cache_dir=str(tmp_path / "cache"))
    assert len(fake_hub) == 1
    assert second == first
    load_dataset_split(spec, 50, 4, embedded=False, seed=1, cache_dir=str(tmp_path / "cache"))
    assert len(fake_hub) == 2


def test_cache_dir_defaults_under_tune_lfm_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNE_LFM_CACHE", str(tmp_path))
    assert loading._cache_file(resolve_dataset("gsm8k"), 40, 4, 0, None).parent == tmp_path / "datasets"


def test_unreachable_hub_error_names_dataset_and_the_ways_out(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetUnavailable) as err:
        load_dataset_split(DATASETS["gsm8k"], 10, 2, embedded=False, cache_dir=str(tmp_path))
    message = str(err.value)
    assert "'gsm8k'" in message and "openai/gsm8k" in message and "--scale tiny" in message and "path" in message


@pytest.mark.parametrize("name", STUDY)
def test_every_embedded_dataset_loads_cleanly(name):
    embedded_rows(name)
    data = load_dataset_split(DATASETS[name], 10_000, 20, embedded=True)
    assert data.source == "embedded"
    assert len(data.train) >= 100 and len(data.eval) == loading.EMBEDDED_EVAL_ROWS
    assert data.rows_skipped == 0, data.skip_reasons
    assert data.rows_seen == len(data.train) + len(data.eval)
    assert embedded_conversations(name, "eval") == data.eval
    assert sorted(map(json.dumps, embedded_conversations(name, "train"))) == sorted(map(json.dumps, data.train))


def test_embedded_train_request_beyond_pool_gives_the_pool_once():
    rows = embedded_rows("gsm8k")
    data = load_dataset_split(DATASETS["gsm8k"], len(rows) * 3, 5, embedded=True)
    assert len(data.train) == len(rows) - loading.EMBEDDED_EVAL_ROWS and len(data.eval) == 5
    assert len({json.dumps(c) for c in data.train}) == len(data.train)


def test_embedded_conversations_rejects_unknown_part():
    with pytest.raises(ValueError, match="part must be one of"):
        embedded_conversations("gsm8k", "validation")


# --- probe -------------------------------------------------------------------------------------------------------

def test_probe_set_loads_and_has_a_fingerprint():
    probe = load_probe()
    assert PROBE_VERSION == "v1" and len(probe) > 0
    assert all(conv[-1]["role"] == "assistant" for conv in probe)
    assert probe_fingerprint() == hashlib.sha256(PROBE_FILE.read_bytes()).hexdigest()


def test_malformed_probe_row_is_an_error_not_a_skip(tmp_path, monkeypatch):
    bad = write_jsonl(tmp_path / "probe.jsonl", [{"messages": [{"role": "user", "content": "Q"}]}])
    monkeypatch.setattr("tune_lfm.data.probe.PROBE_FILE", bad)
    with pytest.raises(ValueError, match="line 1: no assistant turn"):
        load_probe()

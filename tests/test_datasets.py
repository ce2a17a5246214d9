"""Data sets: prompts, label masks, splits, errors, custom and chat data sets, the tokenisation cache and
rank-0-only tokenisation.

Tests taking ``data_root`` (see conftest.py) run on the synthetic files in tests/fixtures, written in each
data set's real format, and again on subsamples of the real files in ../shared/data when it exists."""
from __future__ import annotations

import csv
import json
import os
import random
import re
from pathlib import Path

import pytest

from shardtune import configs as C
from shardtune.datasets import DATASET_PREPROC, Builder, get_custom_data_collator, get_preprocessed_dataset
from shardtune.errors import ConfigError
from shardtune.models.loss import IGNORE_INDEX

# The reference's templates, written out here rather than imported, so that a change to them fails a test.
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                "### Input:\n{input}\n\n### Response:")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.\n\n### Instruction:\n{instruction}\n\n### Response:")
SAMSUM = "Summarize this dialog:\n{dialog}\n---\nSummary:\n"
GRAMMAR = "Correct this to standard English: {input}\n---\nCorrected: "


@pytest.fixture(scope="module")
def tok(bundled_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_tokenizer_dir)


def _train_cfg(tmp_path, context_length=4096):
    return C.train_config(output_dir=str(tmp_path), context_length=context_length)


def assert_prompt_then_target_eos(samples, tok, pairs):
    """Each sample is [bos] prompt (labels -100) followed by target + eos (supervised), decoded exactly."""
    assert len(samples) == len(pairs)
    for sample, (prompt, target) in zip(samples, pairs):
        ids, labels = sample["input_ids"], sample["labels"]
        n_prompt = sum(1 for x in labels if x == IGNORE_INDEX)
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
        supervised = ids[n_prompt:]
        assert supervised[-1] == tok.eos_token_id
        assert tok.decode(supervised[:-1]) == target
        assert ids[0] == tok.bos_token_id and tok.decode(ids[1:n_prompt]) == prompt


# ---------------------------------------------------------------------------------------------- alpaca
@pytest.fixture(scope="module")
def alpaca_subsample(data_root, tmp_path_factory):
    """60 records: the first 50, 5 with an empty output and 5 more with an input."""
    records = json.loads((data_root / "alpaca" / "alpaca_data.json").read_text(encoding="utf-8"))
    empty = [r for r in records if not r["output"].strip()][:5]
    with_input = [r for r in records[50:] if r["input"] and r["output"].strip()][:5]
    sample = records[:50] + empty + with_input
    assert len(empty) == len(with_input) == 5 and all(r["output"].strip() for r in records[:50])
    path = tmp_path_factory.mktemp("alpaca") / "alpaca_data.json"
    path.write_text(json.dumps(sample), encoding="utf-8")
    return path, sample


def test_alpaca_supervises_exactly_output_plus_eos(alpaca_subsample, tok, tmp_path, capsys):
    from shardtune.datasets.common import split_records

    path, records = alpaca_subsample
    cfg = C.alpaca_dataset(data_path=str(path))
    for split in ("train", "val"):
        samples = get_preprocessed_dataset(tok, cfg, split, _train_cfg(tmp_path))
        expected = [(ALPACA_INPUT if r["input"] else ALPACA_NO_INPUT).format(**r) for r in
                    split_records(records, split, "x") if r["output"].strip()]
        targets = [r["output"] for r in split_records(records, split, "x") if r["output"].strip()]
        assert_prompt_then_target_eos(samples, tok, list(zip(expected, targets)))
    skipped = re.findall(r"skipped (\d+) of \d+ records with an empty instruction or output", capsys.readouterr().err)
    assert sum(map(int, skipped)) == 5


def test_alpaca_validation_split_is_fixed_and_disjoint(alpaca_subsample):
    from shardtune.datasets.alpaca_dataset import load_examples

    path, records = alpaca_subsample
    cfg = C.alpaca_dataset(data_path=str(path))
    random.seed(0)
    train, val = load_examples(cfg, "train"), load_examples(cfg, "val")
    random.seed(99)  # global RNG state must not matter
    assert load_examples(cfg, "val") == val
    targets = {r["output"] for r in records if r["output"].strip()}
    assert {e["target"] for e in train} | {e["target"] for e in val} == targets
    assert not {e["prompt"] + e["target"] for e in train} & {e["prompt"] + e["target"] for e in val}
    assert len(train) + len(val) == 55 and 1 <= len(val) <= 3  # 5% of the 60 records, minus empty outputs


# ---------------------------------------------------------------------------------------------- samsum
@pytest.fixture(scope="module")
def samsum_folder(data_root, tmp_path_factory):
    """The corpus layout with a few records per split, plus the train record with no dialogue."""
    folder = tmp_path_factory.mktemp("samsum")
    picked = {}
    for name, n in (("train.json", 20), ("val.json", 8), ("test.json", 6)):
        records = json.loads((data_root / "samsum" / name).read_text(encoding="utf-8"))
        picked[name] = records[:n] + [r for r in records[n:] if not r["dialogue"].strip()]
        (folder / name).write_text(json.dumps(picked[name]), encoding="utf-8")
    empty = [r for r in picked["train.json"] if not r["dialogue"].strip()]
    assert len(empty) == 1, "the train split has one record with an empty dialogue (real: id 13828807)"
    return folder, picked


@pytest.mark.parametrize("split,file", [("train", "train.json"), ("validation", "val.json"), ("test", "test.json")])
def test_samsum_local_folder_splits_and_masks(split, file, samsum_folder, tok, tmp_path, capsys):
    folder, picked = samsum_folder
    cfg = C.samsum_dataset(data_path=str(folder), train_split=split)
    samples = get_preprocessed_dataset(tok, cfg, "train", _train_cfg(tmp_path))
    records = [r for r in picked[file] if r["dialogue"].strip()]
    pairs = [(SAMSUM.format(dialog=r["dialogue"].replace("\r\n", "\n")), r["summary"]) for r in records]
    assert_prompt_then_target_eos(samples, tok, pairs)
    if split == "train":
        n = len(picked[file])
        (warning,) = [ln for ln in capsys.readouterr().err.splitlines() if "warning: " in ln]
        assert f"1 of {n}" in warning and "dialogue" in warning


def test_samsum_hub_id_offline_and_online_errors_are_one_line(monkeypatch):
    from shardtune.datasets import samsum_dataset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"--samsum_dataset.data_path: 'knkarthick/samsum' is not a local folder, "
                                          r"and the hub is offline") as exc:
        samsum_dataset.load_examples(C.samsum_dataset(), "train")
    assert "\n" not in str(exc.value) and "train.json" in str(exc.value)

    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("down\nx")))
    with pytest.raises(ConfigError, match=r"cannot load 'knkarthick/samsum' split 'train' from the hub: down$"):
        samsum_dataset.load_examples(C.samsum_dataset(), "train")
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split: [{"dialogue": "A: hi", "summary": "A greets."}])
    assert samsum_dataset.load_examples(C.samsum_dataset(), "validation") == [
        {"prompt": SAMSUM.format(dialog="A: hi"), "target": "A greets."}]


# ---------------------------------------------------------------------------------------------- grammar
def test_grammar_csv_with_byte_order_mark(data_root, tok, tmp_path):
    with open(data_root / "grammar" / "gtrain_10k.csv", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows = rows[:15] + rows[-15:]  # JFLEG rows first, C4_200M rows last
    assert any("," in r["input"] and '"' in r["input"] for r in rows)  # CSV quoting is exercised
    path = tmp_path / "gtrain.csv"
    with open(path, "w", encoding="utf-8-sig", newline="") as fh:  # as llama-recipes' notebook writes it
        writer = csv.DictWriter(fh, fieldnames=["input", "target"])
        writer.writeheader()
        writer.writerows(rows)
    cfg = C.grammar_dataset(train_split=str(path), test_split=str(data_root / "grammar" / "grammar_validation.csv"))
    samples = get_preprocessed_dataset(tok, cfg, "train", _train_cfg(tmp_path))
    assert_prompt_then_target_eos(samples, tok, [(GRAMMAR.format(input=r["input"]), r["target"]) for r in rows])
    with open(cfg.test_split, encoding="utf-8", newline="") as fh:  # the validation file, as distributed
        val_rows = list(csv.DictReader(fh))
    val = get_preprocessed_dataset(tok, cfg, "val", _train_cfg(tmp_path))
    assert_prompt_then_target_eos(val, tok, [(GRAMMAR.format(input=r["input"]), r["target"]) for r in val_rows])


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name,overrides,flag,source", [
    ("alpaca_dataset", {"data_path": "nope/alpaca.json"}, "--alpaca_dataset.data_path", "tatsu-lab/stanford_alpaca"),
    ("grammar_dataset", {}, "--grammar_dataset.train_split", "grammar_dataset_process.ipynb"),
    ("samsum_dataset", {"data_path": "nope/samsum"}, "--samsum_dataset.data_path", "SAMSum corpus"),
    ("chat_dataset", {}, "--chat_dataset.data_path", "{messages: [{role, content}, ...]}"),
])
def test_missing_data_is_one_line_naming_flag_and_source(name, overrides, flag, source, tok, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the defaults are relative to the working directory
    cfg = C.DATASET_CONFIGS[name](**overrides)
    with pytest.raises(ConfigError) as exc:
        get_preprocessed_dataset(tok, cfg, "train", _train_cfg(tmp_path))
    message = str(exc.value)
    assert "\n" not in message and message.startswith(flag) and f"set {flag} to" in message and source in message


def test_defaults_point_to_usual_places():
    assert C.grammar_dataset().train_split == "data/grammar/gtrain_10k.csv"
    assert C.samsum_dataset().data_path == "knkarthick/samsum" and C.chat_dataset().data_path == "data/chat.jsonl"
    assert Path(C.alpaca_dataset().data_path).is_file()  # the bundled sample


def test_samples_without_supervised_token_after_truncation_are_dropped_with_one_warning(samsum_folder, tok,
                                                                                         tmp_path, capsys):
    folder, picked = samsum_folder
    cfg = C.samsum_dataset(data_path=str(folder), train_split="validation")
    full = get_preprocessed_dataset(tok, cfg, "train", _train_cfg(tmp_path))
    capsys.readouterr()
    context = sorted(s["target_start"] for s in full)[len(full) // 2]  # half the prompts fill the context
    cut = get_preprocessed_dataset(tok, cfg, "train", _train_cfg(tmp_path, context))
    expected_drop = sum(1 for s in full if s["target_start"] >= context)
    assert 0 < expected_drop < len(full)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert (f"dropped {expected_drop} of {len(full)} samples that have no supervised token: {expected_drop} whose "
            f"target lies beyond context_length={context}") in err
    assert len(cut) == len(full) - expected_drop
    assert all(any(x != IGNORE_INDEX for x in s["labels"][1:context]) for s in cut)


# ---------------------------------------------------------------------------------------------- cache
def _counting_builder(monkeypatch, name="alpaca_dataset"):
    calls = []
    original = DATASET_PREPROC[name]

    def tokenize(example, tokenizer, cfg):
        calls.append(example["target"])
        return original.tokenize(example, tokenizer, cfg)

    monkeypatch.setitem(DATASET_PREPROC, name, Builder(original.load_examples, tokenize))
    return calls


def test_tokenisation_is_cached_and_keyed_on_tokenizer_and_data(alpaca_subsample, tok, tmp_path, monkeypatch):
    calls = _counting_builder(monkeypatch)
    path, _ = alpaca_subsample
    cfg, t = C.alpaca_dataset(data_path=str(path)), _train_cfg(tmp_path)
    first = get_preprocessed_dataset(tok, cfg, "train", t)
    assert len(calls) == len(first) > 0
    again = get_preprocessed_dataset(tok, cfg, "train", t)
    assert len(calls) == len(first), "second call must read the cache"
    assert again[:] == first[:]
    files = list((tmp_path / "data_cache").glob("alpaca_dataset-train-*.arrow"))
    assert len(files) == 1

    other_tok = tok.__class__.from_pretrained(tok.name_or_path)
    other_tok.chat_template = "{{ messages }}"  # any change to the tokenizer's definition
    get_preprocessed_dataset(other_tok, cfg, "train", t)
    assert len(calls) == 2 * len(first)
    edited = tmp_path / "edited.json"
    records = json.loads(path.read_text())
    records[0]["output"] += " (edited)"
    edited.write_text(json.dumps(records))
    get_preprocessed_dataset(tok, C.alpaca_dataset(data_path=str(edited)), "train", t)
    assert len(calls) == 3 * len(first)
    assert len(list((tmp_path / "data_cache").glob("*.arrow"))) == 3


_FORKED = {}  # what the forked ranks inherit from the test: the tokenizer and the tokenise-call log


def _rank_worker(rank, port, out_dir, data_path):
    """One of two forked ranks: the real setup() path, then the data pipeline."""
    import torch.distributed as dist

    from shardtune.utils import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    distributed.setup(enable_fsdp=True)
    t = C.train_config(output_dir=str(out_dir), context_length=4096)
    samples = get_preprocessed_dataset(_FORKED["tok"], C.alpaca_dataset(data_path=data_path), "train", t)
    try:
        get_preprocessed_dataset(_FORKED["tok"], C.alpaca_dataset(data_path=data_path + ".missing"), "train", t)
        error = ""
    except ConfigError as exc:
        error = str(exc)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(
        {"tokenised": len(_FORKED["calls"]), "n": len(samples), "first": samples[0]["input_ids"], "error": error}))
    dist.destroy_process_group()


def test_rank0_tokenises_while_the_other_rank_waits_and_reads_the_cache(alpaca_subsample, tok, tmp_path,
                                                                        monkeypatch, free_port):
    import torch.multiprocessing as mp

    monkeypatch.setitem(_FORKED, "calls", _counting_builder(monkeypatch))
    monkeypatch.setitem(_FORKED, "tok", tok)
    path, _ = alpaca_subsample
    mp.start_processes(_rank_worker, args=(free_port, str(tmp_path), str(path)), nprocs=2, start_method="fork")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["tokenised"] == r0["n"] > 0 and r1["tokenised"] == 0
    assert r1["n"] == r0["n"] and r1["first"] == r0["first"]
    # a failure on rank 0 reaches the waiting rank as an error instead of a hang
    assert r0["error"].startswith("--alpaca_dataset.data_path: file not found")
    assert r1["error"] == r0["error"]  # the same one-line ConfigError on every rank


# ---------------------------------------------------------------------------------------------- custom
CUSTOM = '''
from pathlib import Path

Path(__file__).with_suffix(".log").open("a").write("executed\\n")


def get_custom_dataset(dataset_config, tokenizer, split):
    return [{"input_ids": [1, 5, 6, 2], "labels": [-100, -100, 6, 2]}] * (6 if split == "train" else 3)


def other_data(dataset_config, tokenizer, split):
    return [{"input_ids": [1, 7, 2], "labels": [-100, 7, 2], "split": split}] * 4


def returns_dict(dataset_config, tokenizer, split):
    return {"train": []}


def returns_none(dataset_config, tokenizer, split):
    return None


def returns_strings(dataset_config, tokenizer, split):
    return ["text"]


def get_data_collator(tokenizer):
    return lambda samples: {"kind": "default hook", "n": len(samples)}


def named_collator(tokenizer):
    return lambda samples: {"kind": "named hook", "n": len(samples)}


def not_a_collator(tokenizer):
    return 42
'''


@pytest.fixture()
def custom_file(tmp_path):
    path = tmp_path / "my_data.py"
    path.write_text(CUSTOM)
    return path


def test_custom_function_and_collator_come_from_separate_hooks(custom_file, tok, tmp_path):
    cfg = C.custom_dataset(file=f"{custom_file}:other_data")
    train = get_preprocessed_dataset(tok, cfg, "train", _train_cfg(tmp_path))
    val = get_preprocessed_dataset(tok, cfg, "val", _train_cfg(tmp_path))
    assert len(train) == 4 and train[0]["split"] == "train" and val[0]["split"] == "validation"
    # the reference called other_data(tokenizer) as the collator here; the collator hook is separate
    assert get_custom_data_collator(tok, cfg)([1, 2]) == {"kind": "default hook", "n": 2}
    cfg.collator = "named_collator"
    assert get_custom_data_collator(tok, cfg)([1]) == {"kind": "named hook", "n": 1}
    assert len(get_preprocessed_dataset(tok, C.custom_dataset(file=str(custom_file)), "train")) == 6
    assert custom_file.with_suffix(".log").read_text() == "executed\n", "the file must be executed once"
    assert get_custom_data_collator(tok, C.alpaca_dataset()) is None


def test_custom_spec_parsing_handles_windows_drive_colons():
    from shardtune.datasets.custom_dataset import parse_spec

    assert parse_spec(r"C:\data\my_data.py") == (r"C:\data\my_data.py", None)
    assert parse_spec(r"C:\data\my_data.py:build") == (r"C:\data\my_data.py", "build")
    assert parse_spec("d:/x/ds.py:fn_2") == ("d:/x/ds.py", "fn_2")
    assert parse_spec("ds.py") == ("ds.py", None)
    with pytest.raises(ConfigError, match="expected 'path.py' or 'path.py:function'"):
        parse_spec("data.json")


@pytest.mark.parametrize("spec,collator,match", [
    ("{dir}/absent.py", "", r"^--custom_dataset.file: file not found: .*absent.py \(set --custom_dataset.file to a "
                            r"Python file defining get_custom_dataset\(dataset_config, tokenizer, split\)\)$"),
    ("{file}:no_such_fn", "", r"^--custom_dataset.file: .*my_data.py defines no function no_such_fn\(dataset_config, "
                              r"tokenizer, split\) \(its functions: get_custom_dataset, get_data_collator, "),
    ("{file}:returns_dict", "", r"returned dict \(a DatasetDict: return one split, e.g. ds\[split\]\); return a "
                                r"map-style data set"),
    ("{file}:returns_none", "", r"returned NoneType; return a map-style data set"),
    ("{file}:returns_strings", "named_collator", None),  # a custom collator may take any samples
    ("{file}", "no_such_collator", r"^--custom_dataset.collator: .*my_data.py defines no function "
                                   r"no_such_collator\(tokenizer\)"),
    ("{file}", "not_a_collator", r"^--custom_dataset.collator: not_a_collator\(tokenizer\) returned int"),
])
def test_custom_errors_are_one_line(spec, collator, match, custom_file, tok):
    cfg = C.custom_dataset(file=spec.format(dir=custom_file.parent, file=custom_file), collator=collator)

    def load():
        get_preprocessed_dataset(tok, cfg, "train")
        return get_custom_data_collator(tok, cfg)

    if match is None:
        assert callable(load())
        return
    with pytest.raises(ConfigError, match=match) as exc:
        load()
    assert "\n" not in str(exc.value)


def test_custom_samples_need_input_ids_and_labels_without_a_collator(tmp_path, tok):
    path = tmp_path / "plain.py"
    path.write_text("def get_custom_dataset(c, t, s):\n    return [{'text': 'hi'}]\n")
    with pytest.raises(ConfigError, match=r"samples must be dicts with 'input_ids' and 'labels' \(got dict \['text'\]"):
        get_preprocessed_dataset(tok, C.custom_dataset(file=str(path)), "train")


# ---------------------------------------------------------------------------------------------- chat
CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]


@pytest.fixture()
def chat_files(tmp_path):
    train = tmp_path / "chat.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in [
        {"messages": CONVERSATION}, {"prompt": "Name a colour.", "completion": "Blue"}]) + "\n")
    val = tmp_path / "chat_val.json"
    val.write_text(json.dumps([{"messages": CONVERSATION[1:3]}]))
    return train, val


def _supervised_runs(sample):
    runs, current = [], []
    for token, label in zip(sample["input_ids"], sample["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_chat_trains_only_on_assistant_replies_plus_eos(chat_files, tok, tmp_path):
    train, val = chat_files
    cfg = C.chat_dataset(data_path=str(train), test_data_path=str(val))
    samples = get_preprocessed_dataset(tok, cfg, "train", _train_cfg(tmp_path))
    conversations = [CONVERSATION, [{"role": "user", "content": "Name a colour."},
                                    {"role": "assistant", "content": "Blue"}]]
    for sample, messages in zip(samples, conversations):
        rendered = tok.apply_chat_template(messages, tokenize=False)
        assert tok.decode(sample["input_ids"]) == rendered  # the tokenizer's own template, nothing lost
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        runs = _supervised_runs(sample)
        assert [tok.decode(r[:-1]) for r in runs] == replies and all(r[-1] == tok.eos_token_id for r in runs)
    (evaluation,) = get_preprocessed_dataset(tok, cfg, "val", _train_cfg(tmp_path))
    assert [tok.decode(r[:-1]) for r in _supervised_runs(evaluation)] == ["Hello! How can I help?"]
    cfg.train_on_prompt = True
    everything = get_preprocessed_dataset(tok, cfg, "train", _train_cfg(tmp_path))[0]
    assert everything["labels"] == everything["input_ids"]


def test_chat_without_template_falls_back_and_unstable_templates_fail(chat_files, bundled_tokenizer_dir, capsys):
    from transformers import AutoTokenizer

    train, _ = chat_files
    cfg = C.chat_dataset(data_path=str(train), test_data_path=str(train))
    plain = AutoTokenizer.from_pretrained(bundled_tokenizer_dir)
    plain.chat_template = None
    sample = get_preprocessed_dataset(plain, cfg, "train")[1]
    (warning,) = [ln for ln in capsys.readouterr().err.splitlines() if "warning: " in ln]
    assert "chat template" in warning
    assert [plain.decode(r) for r in _supervised_runs(sample)] == ["Blue</s>"]

    plain.chat_template = "{% for m in messages | reverse %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ConfigError, match="renders a conversation prefix differently"):
        get_preprocessed_dataset(plain, cfg, "train")


def test_chat_bad_records_name_the_record(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ConfigError, match=r"^--chat_dataset.data_path: .*bad.jsonl, line 2 has neither 'messages' "
                                          r"nor 'prompt'/'completion'"):
        get_preprocessed_dataset(tok, C.chat_dataset(data_path=str(path)), "train")
    path.write_text(json.dumps({"messages": CONVERSATION[:2]}) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl, line 1 has no assistant message"):
        get_preprocessed_dataset(tok, C.chat_dataset(data_path=str(path)), "train")
    listed = tmp_path / "bad.json"
    listed.write_text(json.dumps([{"messages": CONVERSATION}, {"text": "hello"}]))
    with pytest.raises(ConfigError, match=r"bad.json, record \[1\] has neither"):
        get_preprocessed_dataset(tok, C.chat_dataset(data_path=str(listed)), "train")


def test_jsonl_line_numbers_count_blank_lines_and_ignore_unicode_separators(tmp_path):
    from shardtune.datasets.common import read_located_records

    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": "x\u2028y"}\r\n\n{"a": 3}\n', encoding="utf-8")
    assert [w for w, _ in read_located_records(path, "--flag", "records")] == ["line 1", "line 3", "line 5"]
    path.write_text('{"a": 1}\n\n{"a": \n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"d.jsonl, line 3: not valid JSON \(Expecting value, column 7\)"):
        read_located_records(path, "--flag", "records")


def _custom_samples(tmp_path, body: str) -> C.custom_dataset:
    path = tmp_path / "samples.py"
    path.write_text(f"def get_custom_dataset(c, t, s):\n    return {body}\n")
    return C.custom_dataset(file=str(path))


@pytest.mark.parametrize("body, match", [
    ("[{'input_ids': [1, 2, 3], 'labels': [1, 2, 3]}, {'input_ids': [1, 4096], 'labels': [1, 2]}]",
     r"samples.py: get_custom_dataset\(..., split='train'\): sample \[1\]: input_ids\[1\] = 4096 is outside the "
     r"vocabulary: token ids must be in 0..2047 \(the tokenizer's 2048 tokens\)$"),
    ("[{'input_ids': [1, 2, 3], 'labels': [-100, -5, 3]}]", r"sample \[0\]: labels\[1\] = -5 is negative.* or -100"),
    ("[{'input_ids': [1, 2, 3], 'labels': [1, 2, 3], 'attention_mask': [1, 1]}]",
     r"attention_mask has 2 entries but input_ids has 3"),
    ("[{'input_ids': [1, 2, 3], 'labels': [1, 2.0, 3]}]", r"labels\[1\] = 2.0 is not an integer"),
    ("[{'input_ids': [1, 2, 3], 'labels': [-100, -100, -100]}] * 3", r"no supervised token in any of its 3 samples"),
])
def test_custom_sample_content_errors_name_the_sample_and_field(body, match, tmp_path, tok):
    with pytest.raises(ConfigError, match=match) as exc:
        get_preprocessed_dataset(tok, _custom_samples(tmp_path, body), "train", _train_cfg(tmp_path))
    assert "\n" not in str(exc.value)


def test_custom_samples_as_tensors_and_numpy_pass_and_unsupervised_ones_are_dropped(tmp_path, tok, capsys):
    import numpy as np
    import torch

    good = {"input_ids": torch.tensor([1, 5, 6]), "labels": np.array([-100, 5, 6]), "attention_mask": [1, 1, 1]}
    samples = [dict(good) for _ in range(4)] + [{"input_ids": [1, 5, 6], "labels": [1, -100, -100]}]
    from shardtune.datasets.checks import Source, check_custom_samples

    kept = check_custom_samples(samples, Source("data", lambda i: f"sample [{i}]"), 2048, None, samples.__getitem__)
    assert len(kept) == 4 and all(k is s for k, s in zip(kept, samples))
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "dropped 1 of 5 samples" in err and "sample [4]" in err

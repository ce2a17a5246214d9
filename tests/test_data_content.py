"""Malformed data and model files are found before the first step: exit status 2, one ``error:`` line naming the
file and the record, line or field, no traceback, and nothing written (the output folder is not created; an
existing one, with the tokenised cache it would get, is left exactly as it was).

Every case runs the real ``finetuning.py`` in a fresh process (tests/fresh_cli.py) on files built here; each run
also gets ``--max_train_step 1``, so a case that wrongly passes the checks trains a step, which the test catches.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fresh_cli import FreshCli
from test_bad_input import ENV, _folder_state, _sentinel_folder, assert_clean_failure

CUSTOM_TEMPLATE = '''
def get_custom_dataset(dataset_config, tokenizer, split):
    samples = [{{"input_ids": [1, 5, 6, 7, 8], "labels": [-100, -100, 6, 7, 8]}} for _ in range(20)]
    {body}
    return samples
'''
# custom data set files: the statement that spoils the good samples
CUSTOM = {
    "oov_input_id": 'samples[3]["input_ids"][2] = 99999',
    "oov_label": 'samples[4]["labels"][3] = 2048',
    "negative_id": 'samples[5]["input_ids"][1] = -7',
    "negative_label": 'samples[5]["labels"][1] = -1',
    "text_ids": 'samples[6] = {"input_ids": "hello world", "labels": "hello world"}',
    "float_ids": 'samples[2]["input_ids"] = [1, 5, 6.5, 7, 8]',
    "nested_ids": 'samples[2]["input_ids"] = [[1, 5], [6, 7]]',
    "none_id": 'samples[2]["labels"] = [-100, None, 6, 7, 8]',
    "short_labels": 'samples[7]["labels"] = [-100, 6, 7, 8]',
    "short_mask": 'samples[8]["attention_mask"] = [1, 1, 1]',
    "not_a_dict": 'samples[9] = [1, 5, 6]',
    "all_unlabelled": 'samples = [{"input_ids": [1, 5, 6, 7, 8], "labels": [-100] * 5} for _ in range(20)]',
    "all_cut_by_context": 'samples = [{"input_ids": list(range(1, 30)), "labels": [-100] * 25 + [9, 9, 9, 9]} '
                          'for _ in range(20)]',
}
CUSTOM_ERRORS = {
    "oov_input_id": "sample [3]: input_ids[2] = 99999 is outside the vocabulary",
    "oov_label": "sample [4]: labels[3] = 2048 is outside the vocabulary",
    "negative_id": "sample [5]: input_ids[1] = -7 is negative",
    "negative_label": "sample [5]: labels[1] = -1 is negative",
    "text_ids": "sample [6]: input_ids is text",
    "float_ids": "sample [2]: input_ids[2] = 6.5 is not an integer",
    "nested_ids": "sample [2]: input_ids must be a flat list",
    "none_id": "sample [2]: labels[1] = None is not an integer",
    "short_labels": "sample [7]: labels has 4 entries but input_ids has 5",
    "short_mask": "sample [8]: attention_mask has 3 entries but input_ids has 5",
    "not_a_dict": "sample [9]: expected a dict",
    "all_unlabelled": "no supervised token in any of its 20 samples",
    "all_cut_by_context": "--context_length 16: too small for any sample",
}
BROKEN_JSONL = (json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n\n"
                + json.dumps({"prompt": "Name a colour \u2028 please", "completion": "Blue"}) + "\n"
                + '{"prompt": "oops", "completion": }\n')  # line 4 (line 2 is blank; U+2028 is no line end)

# (case id, arguments, key words the error line must hold). {names} are paths of the `files` fixture.
CASES = [
    *[(f"custom_{name}", ["--dataset", "custom_dataset", "--custom_dataset.file", f"{{{name}}}", "--context_length", "16"],
       [f"{name}.py", CUSTOM_ERRORS[name]]) for name in CUSTOM],
    ("custom_file_is_dir", ["--dataset", "custom_dataset", "--custom_dataset.file", "{dir_py}"],
     ["--custom_dataset.file", "is a directory"]),
    ("alpaca_broken_jsonl_line", ["--alpaca_dataset.data_path", "{alpaca_broken_jsonl}"],
     ["alpaca_broken.jsonl, line 3: not valid JSON"]),
    ("alpaca_jsonl_not_object", ["--alpaca_dataset.data_path", "{alpaca_array_jsonl}"],
     ["alpaca_array.jsonl, line 2 is a JSON array"]),
    ("alpaca_record_fields", ["--alpaca_dataset.data_path", "{alpaca_no_output_json}"],
     ["alpaca_no_output.json, record [1] has no 'output'"]),
    ("alpaca_is_dir", ["--alpaca_dataset.data_path", "{a_dir}"], ["--alpaca_dataset.data_path", "is a directory"]),
    ("alpaca_no_supervised_token", ["--context_length", "8"], ["--context_length 8", "no supervised token"]),
    ("chat_broken_jsonl_line", ["--dataset", "chat_dataset", "--chat_dataset.data_path", "{chat_broken_jsonl}"],
     ["chat_broken.jsonl, line 4: not valid JSON"]),
    ("chat_bad_record_line", ["--dataset", "chat_dataset", "--chat_dataset.data_path", "{chat_no_messages_jsonl}"],
     ["chat_no_messages.jsonl, line 3 has neither 'messages'"]),
    ("chat_is_dir", ["--dataset", "chat_dataset", "--chat_dataset.data_path", "{a_dir}"],
     ["--chat_dataset.data_path", "is a directory"]),
    ("chat_test_is_dir", ["--dataset", "chat_dataset", "--chat_dataset.data_path", "{chat_good_jsonl}",
                          "--chat_dataset.test_data_path", "{a_dir}"], ["--chat_dataset.test_data_path", "is a directory"]),
    ("grammar_train_is_dir", ["--dataset", "grammar_dataset", "--grammar_dataset.train_split", "{a_dir}",
                              "--grammar_dataset.test_split", "{grammar_csv}"],
     ["--grammar_dataset.train_split", "is a directory"]),
    ("grammar_test_is_dir", ["--dataset", "grammar_dataset", "--grammar_dataset.train_split", "{grammar_csv}",
                             "--grammar_dataset.test_split", "{a_dir}"], ["--grammar_dataset.test_split", "is a directory"]),
    ("samsum_file_not_folder", ["--dataset", "samsum_dataset", "--samsum_dataset.data_path", "{samsum_train_json}"],
     ["--samsum_dataset.data_path", "train.json is a file; give the folder"]),
    ("samsum_split_is_dir", ["--dataset", "samsum_dataset", "--samsum_dataset.data_path", "{samsum_dir_split}"],
     ["--samsum_dataset.data_path", "train.json is a directory"]),
    ("model_config_more_layers", ["--model_name", "{model_more_layers}"],
     ["model_more_layers/config.json", "asks for 6 decoder layers", "layers 4-5"]),
    ("model_config_other_shape", ["--model_name", "{model_other_shape}"],
     ["model.safetensors", "down_proj.weight with shape [128, 352]", "model_other_shape/config.json"]),
    ("config_not_utf8", ["--config", "{latin1_yaml}"], ["--config", "latin1.yaml is not UTF-8"]),
    ("config_is_dir", ["--config", "{a_dir}"], ["--config", "is a directory"]),
]


def _write_files(d: Path) -> dict:
    from shardtune.configs.paths import BUNDLED_ALPACA_SAMPLE, BUNDLED_MODEL_DIR

    files = {"a_dir": d / "a_dir", "dir_py": d / "ds_folder.py"}
    files["a_dir"].mkdir()
    files["dir_py"].mkdir()
    for name, body in CUSTOM.items():
        files[name] = d / f"{name}.py"
        files[name].write_text(CUSTOM_TEMPLATE.format(body=body))
    alpaca = json.loads(Path(BUNDLED_ALPACA_SAMPLE).read_text())[:3]
    chat = [{"prompt": f"Say {i}", "completion": str(i)} for i in range(30)]
    texts = {
        "alpaca_broken.jsonl": json.dumps(alpaca[0]) + "\n\n" + json.dumps(alpaca[1])[:-5] + "\n",
        "alpaca_array.jsonl": json.dumps(alpaca[0]) + "\n[1, 2]\n",
        "alpaca_no_output.json": json.dumps([alpaca[0], {"instruction": "x", "input": ""}]),
        "chat_broken.jsonl": BROKEN_JSONL,
        "chat_no_messages.jsonl": json.dumps(chat[0]) + "\n" + json.dumps(chat[1]) + "\n" + '{"text": "hi"}\n',
        "chat_good.jsonl": "".join(json.dumps(r) + "\n" for r in chat),
        "grammar.csv": "input,target\n" + "".join(f"sentense {i},sentence {i}\n" for i in range(30)),
    }
    for name, text in texts.items():
        files[name.replace(".", "_")] = d / name
        (d / name).write_text(text, encoding="utf-8")
    files["latin1_yaml"] = d / "latin1.yaml"
    files["latin1_yaml"].write_bytes("output_dir: caf\u00e9\n".encode("latin-1"))
    samsum = d / "samsum"
    samsum.mkdir()
    files["samsum_train_json"] = samsum / "train.json"
    files["samsum_train_json"].write_text(json.dumps([{"id": "1", "dialogue": "A: hi", "summary": "A greets."}]))
    files["samsum_dir_split"] = d / "samsum_dir_split"
    (files["samsum_dir_split"] / "train.json").mkdir(parents=True)
    for name, edit in (("model_more_layers", ('"num_hidden_layers": 4', '"num_hidden_layers": 6')),
                       ("model_other_shape", ('"intermediate_size": 352', '"intermediate_size": 256'))):
        files[name] = d / name
        shutil.copytree(BUNDLED_MODEL_DIR, files[name])
        config = files[name] / "config.json"
        assert edit[0] in config.read_text()
        config.write_text(config.read_text().replace(*edit))
    return files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _write_files(tmp_path_factory.mktemp("data_content"))


@pytest.fixture(scope="module")
def fresh_cli():
    server = FreshCli(ENV)
    yield server
    server.close()


def _run(fresh_cli, files, args, out_dir: Path, cwd: Path, extra=()):
    names = {k: str(v) for k, v in files.items()}
    common = ["--output_dir", str(out_dir), "--num_workers_dataloader", "0", "--max_train_step", "1",
              "--batch_size_training", "1", *extra]
    return fresh_cli.run(common + [a.format(**names) for a in args], cwd=cwd, log_dir=cwd)


@pytest.mark.parametrize("case, args, expected", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_fails_before_the_first_step(case, args, expected, files, fresh_cli, tmp_path):
    out_dir = tmp_path / "out"
    rc, stdout, stderr = _run(fresh_cli, files, args, out_dir, tmp_path)
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert rc == 2, f"exit status {rc}\n{stderr[-3000:]}"
    assert "Traceback" not in stdout + stderr
    assert len(errors) == 1 and all(word in errors[0] for word in expected), (expected, stderr[-3000:])
    assert "step 1 |" not in stdout and "Training epoch" not in stderr
    assert not out_dir.exists(), sorted(_folder_state(out_dir))


@pytest.mark.parametrize("case", ["alpaca_no_supervised_token", "custom_all_unlabelled", "chat_broken_jsonl_line"])
def test_an_existing_output_folder_is_left_as_it_was(case, files, fresh_cli, tmp_path):
    """The tokenised cache (<output_dir>/data_cache) written before the check refuses the data is removed."""
    args, expected = next((a, e) for c, a, e in CASES if c == case)
    out_dir = tmp_path / "out"
    before = _sentinel_folder(out_dir)
    rc, stdout, stderr = _run(fresh_cli, files, args, out_dir, tmp_path)
    assert_clean_failure(rc, stdout, stderr, expected[-1], out_dir, before)


def test_a_run_with_some_unsupervised_samples_drops_them_and_trains(files, fresh_cli, tmp_path):
    data = tmp_path / "some_unlabelled.py"
    data.write_text(CUSTOM_TEMPLATE.format(body='for i in (2, 11, 17):\n        samples[i]["labels"] = [-100] * 5'))
    out_dir = tmp_path / "out"
    rc, stdout, stderr = _run(fresh_cli, files, ["--dataset", "custom_dataset", "--custom_dataset.file", str(data)],
                              out_dir, tmp_path, extra=["--num_epochs", "1", "--batching_strategy", "padding"])
    assert rc == 0, stderr[-3000:]
    warnings = [ln for ln in stderr.splitlines() if "dropped" in ln]
    # one warning per split (train and eval come from the same function), each counting and naming them
    assert len(warnings) == 2 and all("3 of 20" in w and "sample [2], sample [11], sample [17]" in w
                                      for w in warnings), stderr
    assert "17 train samples" in stdout
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["tokens_seen"] > 0


def test_weight_checks_accept_real_layouts(tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    """No false alarm: tied embeddings (GPT-2 has no lm_head tensor), sharded weights with an index, weights saved
    from the base model (no 'model.' prefix), and a config asking for fewer layers than the weights hold."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from shardtune.errors import ConfigError
    from shardtune.models.loading import ModelSource, check_weight_files

    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.save_pretrained(sharded, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    save_file({k: v.contiguous() for k, v in model.model.state_dict().items()} | {"lm_head.weight": model.lm_head.weight},
              str(base / "model.safetensors"))
    fewer = tmp_path / "fewer"
    shutil.copytree(tiny_llama_dir, fewer)
    config = json.loads((fewer / "config.json").read_text())
    (fewer / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    for folder in (tiny_llama_dir, tiny_gpt2_dir, sharded, base, fewer):
        check_weight_files(ModelSource.parse(str(folder)))
    # ... and a shard that its index names but the folder lacks is one line
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ConfigError, match=f"names 1 weight file.*{shard.name}"):
        check_weight_files(ModelSource.parse(str(sharded)))

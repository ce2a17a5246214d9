"""Chat / instruction data for any model: JSON or JSONL records rendered with the tokenizer's chat template.

Each record is either ``{"messages": [{"role": ..., "content": ...}, ...]}`` or
``{"prompt": ..., "completion": ...}`` (strings, or lists of messages). Only assistant turns are
trained on (labels -100 elsewhere) unless ``train_on_prompt``.

How assistant tokens are found for *any* template: the conversation is rendered turn by turn.
For an assistant turn i, ``render(messages[:i], add_generation_prompt=True)`` ends where the reply
starts and ``render(messages[:i+1])`` ends where it stops; the text between them (the reply and the
template's end-of-turn marker, without trailing whitespace) is supervised, the rest is not. Each
piece is tokenised on its own, so the mask is exact. This needs a template whose rendering of a
conversation prefix is a prefix of the whole rendering, which holds for the common templates;
otherwise a one-line error says so.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from shardtune.datasets.common import TRAIN_SPLITS, VAL_SPLITS, read_located_records, require_file, split_records
from shardtune.errors import ConfigError
from shardtune.models.loss import IGNORE_INDEX
from shardtune.utils.logging import warn

# Used when the tokenizer has no chat template (the same format as the bundled tiny model's).
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
FORMAT = "JSON or JSONL records of {messages: [{role, content}, ...]} or {prompt, completion}"
SOURCE = f"your file of {FORMAT}"


def to_messages(record: dict, where: str) -> List[Dict[str, str]]:
    """The record as a list of {role, content} messages; raises ConfigError naming the bad record."""
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        messages = (prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]) + (
            completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}])
    else:
        raise ConfigError(f"{where} has neither 'messages' nor 'prompt'/'completion' (expected {FORMAT})")
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ConfigError(f"{where}: messages must be a list of {{role, content}} objects with string values")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(f"{where} has no assistant message, so nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _read(path: str, flag: str) -> List[dict]:
    file = require_file(path, flag, SOURCE)
    return [{"messages": to_messages(record, f"{flag}: {path}, {where}")}
            for where, record in read_located_records(file, flag, FORMAT)]


def load_examples(dataset_config, split: str) -> List[dict]:
    if split not in TRAIN_SPLITS + VAL_SPLITS:
        raise ConfigError(f"--chat_dataset.train_split/test_split: expected 'train' or 'val', got {split!r}")
    if dataset_config.test_data_path:  # separate files: no split needed
        if split in TRAIN_SPLITS:
            return _read(dataset_config.data_path, "--chat_dataset.data_path")
        return _read(dataset_config.test_data_path, "--chat_dataset.test_data_path")
    return split_records(_read(dataset_config.data_path, "--chat_dataset.data_path"), split,
                         "--chat_dataset.train_split/test_split")


_warned_tokenizers = set()  # ids of tokenizers already warned about (the renderer runs once per example)


def _render_fn(tokenizer):
    extra = {}
    if not getattr(tokenizer, "chat_template", None):
        extra["chat_template"] = DEFAULT_CHAT_TEMPLATE
        if id(tokenizer) not in _warned_tokenizers:
            _warned_tokenizers.add(id(tokenizer))
            warn("chat_dataset: the tokenizer has no chat template; using '<|role|>\\n{content}</s>' turns")

    def render(messages, add_generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **extra)

    return render


def chat_segments(tokenizer, messages: List[dict]) -> List[Tuple[str, bool]]:
    """The rendered conversation as consecutive (text, is_assistant_reply) pieces."""
    render = _render_fn(tokenizer)
    segments: List[Tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head, full = render(messages[:i], add_generation_prompt=True), render(messages[: i + 1])
        if not (head.startswith(done) and full.startswith(head)):
            raise ConfigError("chat_dataset: the tokenizer's chat template renders a conversation prefix differently "
                              "from the whole conversation, so assistant tokens cannot be located; use a model whose "
                              "template is prefix-stable or a custom_dataset")
        reply = full[len(head):].rstrip()
        segments += [(head[len(done):], False), (reply, True)]
        done = head + reply
    segments.append((render(messages)[len(done):], False))
    return [(text, supervised) for text, supervised in segments if text]


def tokenize_chat(example: dict, tokenizer, dataset_config) -> Dict[str, List[int]]:
    train_all = bool(getattr(dataset_config, "train_on_prompt", False))
    input_ids: List[int] = []
    labels: List[int] = []
    for text, supervised in chat_segments(tokenizer, example["messages"]):
        ids = tokenizer.encode(text, add_special_tokens=False)
        input_ids += ids
        labels += ids if supervised or train_all else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids, "labels": labels}

"""Dataset configs. The class name is the ``--dataset`` value and the ``--<name>.field`` prefix.

Relative paths are resolved against the current directory; the defaults expect the layout
``data/<name>/...`` (or, for samsum, the hub). A missing file gives one error line that names the
flag that sets the path and where the data set comes from. docs/datasets.md describes each format.
"""
from dataclasses import dataclass

from shardtune.configs._field import doc
from shardtune.configs.paths import BUNDLED_ALPACA_SAMPLE


@dataclass
class samsum_dataset:
    """SAMSum dialogue summarisation (--dataset samsum_dataset), from a local folder or the hub."""

    NEEDS = ("dataset=samsum_dataset",)

    dataset: str = doc("samsum_dataset", "Data set name (fixed).", choices=("samsum_dataset",))
    data_path: str = doc("knkarthick/samsum", "A local folder holding train.json / val.json / test.json of the "
                                              "SAMSum corpus (e.g. data/samsum), or a Hugging Face hub id (needs "
                                              "the network).")
    train_split: str = doc("train", "Split used for training: train, validation or test.")
    test_split: str = doc("validation", "Split used for evaluation ('validation' reads val.json in a local "
                                        "folder).")


@dataclass
class grammar_dataset:
    """Grammar correction pairs from CSV files (--dataset grammar_dataset)."""

    NEEDS = ("dataset=grammar_dataset",)

    dataset: str = doc("grammar_dataset", "Data set name (fixed).", choices=("grammar_dataset",))
    train_split: str = doc("data/grammar/gtrain_10k.csv", "CSV with input,target columns for training "
                                                          "(made by llama-recipes' grammar_dataset_process "
                                                          "notebook from JFLEG + C4_200M).")
    test_split: str = doc("data/grammar/grammar_validation.csv", "CSV with input,target columns for "
                                                                 "evaluation.")


@dataclass
class alpaca_dataset:
    """Stanford Alpaca instructions (--dataset alpaca_dataset, the default; a sample ships with the package)."""

    NEEDS = ("dataset=alpaca_dataset",)

    dataset: str = doc("alpaca_dataset", "Data set name (fixed).", choices=("alpaca_dataset",))
    data_path: str = doc(str(BUNDLED_ALPACA_SAMPLE), "Stanford Alpaca JSON (a list of instruction/input/output "
                                                     "records). Default: a 2,000-record sample bundled with the "
                                                     "package; the full alpaca_data.json comes from "
                                                     "github.com/tatsu-lab/stanford_alpaca.")
    train_split: str = doc("train", "'train': all records but the validation ones.")
    test_split: str = doc("val", "'val': a fixed, seeded 5% of the records.")


@dataclass
class custom_dataset:
    """Your own Python function that returns the data set (--dataset custom_dataset)."""

    NEEDS = ("dataset=custom_dataset",)

    dataset: str = doc("custom_dataset", "Data set name (fixed).", choices=("custom_dataset",))
    file: str = doc("custom_dataset.py", "Python file defining get_custom_dataset(dataset_config, tokenizer, "
                                         "split); 'file.py:function' names another function.")
    collator: str = doc("", "Function in the same file that returns a collator, called as fn(tokenizer) "
                            "(default: get_data_collator when it exists).")
    train_split: str = doc("train", "Split name passed to the function for training.")
    test_split: str = doc("validation", "Split name passed to the function for evaluation.")
    data_path: str = doc("", "Free-form path for the user's function.")


@dataclass
class chat_dataset:
    """Chat records rendered with the tokenizer's chat template (--dataset chat_dataset)."""

    NEEDS = ("dataset=chat_dataset",)

    dataset: str = doc("chat_dataset", "Data set name (fixed).", choices=("chat_dataset",))
    data_path: str = doc("data/chat.jsonl", "JSON or JSONL file of records with 'messages' (list of {role, content}) "
                                            "or 'prompt'/'completion' pairs, rendered with the tokenizer's chat "
                                            "template.")
    test_data_path: str = doc("", "Separate evaluation file; empty: a seeded 5% split of data_path.")
    train_split: str = doc("train", "'train' or 'val'.")
    test_split: str = doc("val", "'train' or 'val'.")
    train_on_prompt: bool = doc(False, "Also train on user/system tokens (default: assistant tokens only).")

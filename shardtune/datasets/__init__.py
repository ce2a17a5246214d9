"""Data set registry: ``--dataset NAME`` -> a builder ``fn(dataset_config, tokenizer, split)``.

Every builder returns a sequence of dicts with ``input_ids``, ``attention_mask`` and ``labels`` (lists of
ints, labels -100 where no loss is taken).
"""
from shardtune.datasets.alpaca_dataset import get_alpaca_dataset

DATASET_PREPROC = {
    "alpaca_dataset": get_alpaca_dataset,
}


def get_preprocessed_dataset(tokenizer, dataset_config, split: str = "train", train_config=None):
    """The tokenised split ('train' -> dataset_config.train_split, anything else -> test_split)."""
    name = dataset_config.dataset
    if name not in DATASET_PREPROC:
        raise NotImplementedError(f"{name} is not implemented yet")
    which = dataset_config.train_split if split == "train" else dataset_config.test_split
    return DATASET_PREPROC[name](dataset_config, tokenizer, which)


def get_custom_data_collator(tokenizer, dataset_config):
    """A collator supplied by a custom data set file, or None for the built-in ones."""
    return None

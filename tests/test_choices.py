"""``iseg.choices``: what the CLI and the demo parse and decide the same way (class lists and
seeds are also tested through the CLI in tests/commands/test_cli.py)."""

from __future__ import annotations

import pytest

from iseg.choices import noise_seeds, parse_classes, vocabulary_ids


def test_vocabulary_ids_map_label_k_to_the_kth_tags_vocabulary_id():
    vocabulary = ["aeroplane", "bicycle", "bird", "boat"]
    # label 0 background; label 1 = "bird" → id 3, label 2 = "aeroplane" → id 1 (1-based)
    assert vocabulary_ids(["bird", "aeroplane"], vocabulary) == [0, 3, 1]
    assert vocabulary_ids([], vocabulary) == [0]
    with pytest.raises(ValueError):
        vocabulary_ids(["cat"], vocabulary)  # not in the vocabulary


def test_parse_classes_refuses_empty_and_repeated_names():
    assert parse_classes("cat") == ("cat",)
    for text in ("", " , ", "cat,,dog", "Cat,cat"):
        with pytest.raises(ValueError):
            parse_classes(text)


def test_noise_seeds_follow_the_input_positions():
    assert noise_seeds(5, 1101, range(3)) == [5, 6, 7]
    assert noise_seeds(None, 1101, range(3)) is None

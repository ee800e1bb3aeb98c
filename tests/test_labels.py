"""Labels: 0..C-1 or class names; a gap is an error unless the class count is given; names
are mapped in sorted order and saved into the model's id2label/label2id."""

import json

import pytest
import torch

from upcycle.errors import UpcycleError
from upcycle.tasks.classification import ClassificationTask


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("labels")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b"]))
    folder = root / "bert"
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(folder)
    BertModel(BertConfig(vocab_size=6, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)).save_pretrained(folder)
    return folder


def write(path, labels):
    path.write_text("".join(json.dumps({"text": "a b", "label": y}) + "\n" for y in labels))
    return path


def test_integer_labels_with_a_gap_are_refused(model_dir, tmp_path):
    task = ClassificationTask(model_dir, "text")
    data = write(tmp_path / "train.jsonl", [0, 1, 2, 3, 4, 9, 1])
    with pytest.raises(UpcycleError, match=r"train.jsonl: the labels \{0, 1, 2, 3, 4, 9\} skip "
                                           r"5, 6, 7, 8.*--num-labels 10"):
        task.read(data, split="training", fix_num_labels=True)
    # with the class count given, the gap is intended
    task = ClassificationTask(model_dir, "text", num_labels=10)
    assert task.read(data, split="training", fix_num_labels=True).labels.max() == 9
    assert task.label_info()["num_labels"] == 10


def test_names_are_mapped_in_sorted_order_and_saved_into_the_model(model_dir, tmp_path):
    task = ClassificationTask(model_dir, "text")
    train = task.read(write(tmp_path / "t.jsonl", ["sport", "business", "tech", "sport"]),
                      split="training", fix_num_labels=True)
    assert train.labels.tolist() == [1, 0, 2, 1]
    assert task.label_info() == {"num_labels": 3,
                                 "id2label": {"0": "business", "1": "sport", "2": "tech"}}
    test = task.read(write(tmp_path / "s.jsonl", ["tech"]), split="test")
    assert test.labels.tolist() == [2]
    with pytest.raises(UpcycleError, match=r"label 'politics' is neither an integer nor one of "
                                           r"the model's classes \['business', 'sport', 'tech'\]"):
        task.read(write(tmp_path / "u.jsonl", ["politics"]), split="test")
    model = task.load_model()
    assert model.config.id2label == {0: "business", 1: "sport", 2: "tech"}
    assert model.config.label2id == {"business": 0, "sport": 1, "tech": 2}
    assert model.classifier.out_features == 3


def test_contiguous_integer_labels_fix_the_class_count(model_dir, tmp_path):
    task = ClassificationTask(model_dir, "text")
    task.read(write(tmp_path / "t.jsonl", [2, 0, 1, 1]), split="training", fix_num_labels=True)
    assert task.num_labels == 3 and task.label_info()["id2label"] is None
    with pytest.raises(UpcycleError, match="label 3 is outside the model's 3 classes"):
        task.read(write(tmp_path / "h.jsonl", [3]), split="held-out")
    with pytest.raises(UpcycleError, match="negative label -1"):
        task.read(write(tmp_path / "n.jsonl", [-1]), split="held-out")
    assert isinstance(task.load_model()(input_ids=torch.tensor([[2, 4, 3]])).logits, torch.Tensor)

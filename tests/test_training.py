"""The tuners are ordinary modules (dtype/device moves, state_dict, copies, torch.compile,
DDP, a plain ``transformers.Trainer``), and :mod:`upcycle.training` (the Trainer bridge):
accumulation, the stop on a non-finite loss, checkpoints of the trained part only."""

from __future__ import annotations

import copy
import io
import math
import time

import pytest
import torch

from upcycle.errors import UpcycleError
from upcycle.runtime.devices import available_devices
from upcycle.tune.lst import get_lst_model
from upcycle.tune.sherl import SherlConfig, get_sherl_model
from upcycle.tune.snell import SnellConfig, get_snell_model

transformers = pytest.importorskip("transformers")
DEVICES = available_devices()
VOCAB = 40


def tiny(family: str, *, seed: int = 0, dropout: float = 0.0, num_labels: int = 2):
    """A tiny random classifier: hidden 32, 2 layers."""
    T = transformers
    torch.manual_seed(seed)
    if family == "bert":
        cfg = T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64, num_labels=num_labels,
                           max_position_embeddings=32, hidden_dropout_prob=dropout,
                           attention_probs_dropout_prob=dropout)
        return T.BertForSequenceClassification(cfg).eval()
    cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                       num_labels=num_labels, pad_token_id=0, resid_pdrop=dropout,
                       embd_pdrop=dropout, attn_pdrop=dropout)
    return T.GPT2ForSequenceClassification(cfg).eval()


TUNERS = {
    "snell": lambda m: get_snell_model(m, SnellConfig(r=4, sparsity=0.5, dropout=0.0,
                                                      drop_path=0.0, learnable_coeffs=True)),
    "sherl": lambda m: get_sherl_model(m, SherlConfig(late_layers=1)),
    "lst": lambda m: get_lst_model(m),
}


def tuned(method: str, family: str, seed: int = 0):
    model = TUNERS[method](tiny(family, seed=seed))
    with torch.no_grad():  # move every trainable tensor off its init (gates open, heads set)
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def inputs(device="cpu", batch: int = 3, length: int = 7, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -2:] = 0  # one padded row
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits.float().cpu()


# -- ordinary modules -------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("method", sorted(TUNERS))
def test_dtype_round_trips_keep_the_outputs(method, family, device):
    model = tuned(method, family).to(device)
    x = inputs(device)
    reference = logits(model, x)
    model.to(torch.float64)
    assert all(t.dtype == torch.float64 for t in model.state_dict().values()
               if t.is_floating_point())
    torch.testing.assert_close(logits(model, x), reference, atol=1e-5, rtol=1e-5)
    model.to(torch.float32)  # float32 -> float64 -> float32 is exact
    torch.testing.assert_close(logits(model, x), reference, atol=0, rtol=0)
    model.bfloat16()
    assert all(t.dtype == torch.bfloat16 for t in model.state_dict().values()
               if t.is_floating_point())
    torch.testing.assert_close(logits(model, x), reference, atol=0.1, rtol=0.05)
    model.float()
    torch.testing.assert_close(logits(model, x), reference, atol=0.1, rtol=0.05)
    model.half()
    assert all(t.dtype == torch.float16 for t in model.state_dict().values()
               if t.is_floating_point())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", sorted(TUNERS))
def test_device_moves_and_state_dict_copies_and_pickles(method, device):
    model = tuned(method, "gpt2")
    x = inputs()
    reference = logits(model, x)
    model.to(device)
    assert {p.device.type for p in model.parameters()} == {torch.device(device).type}
    assert {b.device.type for b in model.buffers()} <= {torch.device(device).type}
    torch.testing.assert_close(logits(model, inputs(device)), reference, atol=1e-5, rtol=1e-4)
    model.cpu()
    other = tuned(method, "gpt2", seed=5)
    assert not torch.allclose(logits(other, x), reference)
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(other, x), reference, atol=0, rtol=0)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(logits(twin, x), reference, atol=0, rtol=0)
    with torch.no_grad():  # the copy runs its own weights, not the original's
        for p in twin.parameters():
            p.zero_()
    torch.testing.assert_close(logits(model, x), reference, atol=0, rtol=0)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(logits(again, x), reference, atol=0, rtol=0)


@pytest.mark.parametrize("method", sorted(TUNERS))
def test_torch_compile_gives_the_same_outputs(method):
    model = tuned(method, "bert")
    x = inputs()
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(logits(compiled, x), logits(model, x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(TUNERS))
def test_ddp_wraps_and_trains(method, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        model = tuned(method, "bert").train()
        wrapped = DistributedDataParallel(model)
        x = inputs()
        out = wrapped(**x, labels=torch.tensor([0, 1, 1]))
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    finally:
        # gloo's worker may still be releasing the all-reduce launched in the backward, which
        # needs the GIL (torch 2.13 keeps a Python object in the work's thread-local state):
        # freeing the group now (DDP's reducer goes at return) would join that worker while
        # holding the GIL. Sleeping releases the GIL so it finishes first.
        time.sleep(0.2)
        dist.destroy_process_group()


# -- a plain transformers.Trainer, as a user would call it ------------------------------------

def _examples(n: int = 8, length: int = 6, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, VOCAB, (length,), generator=g),
             "attention_mask": torch.ones(length, dtype=torch.long), "labels": i % 2,
             "note": f"example {i}"}  # a column the models do not take: Trainer drops it
            for i in range(n)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("method", ["snell", "sherl"])
def test_plain_trainer_trains_one_step(method, family, device, tmp_path):
    T = transformers
    model = TUNERS[method](tiny(family))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def collate(features):
        batch = {k: torch.stack([f[k] for f in features])
                 for k in ("input_ids", "attention_mask")}
        batch["labels"] = torch.tensor([f["labels"] for f in features])
        assert "note" not in features[0]  # remove_unused_columns read the forward's signature
        return batch

    args = T.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                               gradient_accumulation_steps=2, max_steps=1, learning_rate=1e-2,
                               use_cpu=device == "cpu", report_to=[], save_strategy="no",
                               disable_tqdm=True, logging_steps=1)
    trainer = T.Trainer(model=model, args=args, train_dataset=_examples(),
                        data_collator=collate)
    output = trainer.train()
    assert output.global_step == 1 and math.isfinite(output.training_loss)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach().cpu(), frozen[n]), n
    assert any(not torch.equal(p.detach().cpu(), trained[n])
               for n, p in model.named_parameters() if n in trained)


@pytest.mark.parametrize("method", sorted(TUNERS))
def test_trainer_logs_to_tensorboard(method, tmp_path, monkeypatch):
    """Trainer's TensorBoard callback writes ``model.config.to_json_string()`` at the start:
    every tuner's config offers it (SHERL's and LST's once did not, so training a SHERL model
    failed wherever tensorboard was installed)."""
    import json

    pytest.importorskip("tensorboard")
    T = transformers
    model = TUNERS[method](tiny("bert"))
    assert isinstance(json.loads(model.config.to_json_string()), dict)

    def collate(features):
        batch = {k: torch.stack([f[k] for f in features])
                 for k in ("input_ids", "attention_mask")}
        batch["labels"] = torch.tensor([f["labels"] for f in features])
        return batch

    # transformers 5 reads TensorBoard's folder from the environment (no logging_dir argument)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "runs"))
    args = T.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                               max_steps=1, use_cpu=True, report_to=["tensorboard"],
                               save_strategy="no", disable_tqdm=True, logging_steps=1)
    T.Trainer(model=model, args=args, train_dataset=_examples(), data_collator=collate).train()
    assert list((tmp_path / "runs").glob("events.out.tfevents.*"))


def test_sherl_loss_honours_num_items_in_batch():
    model = tuned("sherl", "bert").train()
    x, labels = inputs(batch=4), torch.tensor([0, 1, 1, 0])
    mean = model(**x, labels=labels).loss
    summed = model(**x, labels=labels, num_items_in_batch=torch.tensor(8)).loss
    torch.testing.assert_close(summed, mean * 4 / 8)


# -- upcycle.training -------------------------------------------------------------------------

def _fit(model, examples, tmp_path=None, **config):
    from upcycle.training.config import TrainingConfig
    from upcycle.training.fit import fit

    settings = dict(max_steps=3, lr=1e-2, batch_size=4, device="cpu", progress=False,
                    report_to=[])
    settings.update(config)
    return fit(model, examples, TrainingConfig(**settings),
               output_dir=None if tmp_path is None else tmp_path / "ckpt")


def _features(examples):
    return [{k: v for k, v in e.items() if k != "note"} for e in examples]


def test_gradient_accumulation_equals_the_whole_batch():
    examples = _features(_examples(16))
    results = []
    for accum in (1, 2, 4):
        model = TUNERS["sherl"](tiny("bert"))
        _fit(model, examples, batch_size=8, grad_accum=accum)
        results.append({n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
    for other in results[1:]:
        for name, value in results[0].items():
            torch.testing.assert_close(other[name], value, atol=1e-5, rtol=1e-4)


def test_batch_that_does_not_split_is_refused():
    with pytest.raises(UpcycleError, match="batch size 6 does not split into 1 rank.*4 "
                                           "accumulation"):
        _fit(TUNERS["snell"](tiny("bert")), _features(_examples()), batch_size=6, grad_accum=4)


@pytest.mark.parametrize("poison_step, save_steps, message, kept", [
    (3, 2, r"training loss became nan at step 4", 2),  # found by the next loss
    (2, 2, r"parameter .*classifier\..*bias became non-finite at step 2", None),  # by the save
])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, poison_step,
                                                                  save_steps, message, kept):
    from transformers import TrainerCallback

    from upcycle.training.config import NonFiniteLossError, TrainingConfig
    from upcycle.training.fit import fit

    class Poison(TrainerCallback):  # what an fp16 overflow or a huge lr does, on the CPU
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == poison_step:
                with torch.no_grad():
                    model.base_model.classifier.bias.fill_(float("nan"))

    model = TUNERS["snell"](tiny("bert"))
    expected = message + (f".*last good checkpoint is .*checkpoint-{kept} \\(step {kept}\\)"
                          if kept else ".*no checkpoint was saved before it")
    with pytest.raises(NonFiniteLossError, match=expected):
        fit(model, _features(_examples()), TrainingConfig(
            max_steps=6, lr=1e-2, batch_size=4, save_steps=save_steps, device="cpu",
            progress=False, report_to=[]), output_dir=tmp_path / "ckpt", callbacks=[Poison()])
    folder = tmp_path / "ckpt"
    if kept is None:  # a fresh run that saved nothing leaves nothing behind
        assert not folder.exists()
        return
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [f"checkpoint-{kept}"]
    from safetensors.torch import load_file

    saved = load_file(str(folder / f"checkpoint-{kept}" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_a_failed_run_closes_its_tensorboard_writer():
    """A run that stops mid-way (here: a non-finite loss) in a temporary folder closes its
    TensorBoard writer before the folder goes, so no writer thread flushes into a deleted
    folder afterwards (seen as a thread exception on the GPU test run)."""
    pytest.importorskip("tensorboard")
    from transformers import TrainerCallback
    from transformers.integrations import TensorBoardCallback

    from upcycle.training.config import NonFiniteLossError, TrainingConfig
    from upcycle.training.fit import fit

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    model.base_model.classifier.bias.fill_(float("nan"))

    board = TensorBoardCallback()
    with pytest.raises(NonFiniteLossError):
        fit(TUNERS["snell"](tiny("bert")), _features(_examples()), TrainingConfig(
            max_steps=6, lr=1e-2, batch_size=4, device="cpu", progress=False, report_to=[]),
            callbacks=[Poison(), board])
    assert board.tb_writer is None


def test_checkpoints_hold_only_the_trained_part(tmp_path):
    from safetensors import safe_open

    model = TUNERS["snell"](tiny("gpt2"))
    _fit(model, _features(_examples()), tmp_path, max_steps=2, save_steps=2)
    # the run is over: fit keeps its checkpoints for the caller to resume or remove
    # a peft model's checkpoint is its adapter, in peft's names (no adapter name in them)
    with safe_open(str(tmp_path / "ckpt" / "checkpoint-2" / "adapter_model.safetensors"),
                   "pt") as f:
        saved = set(f.keys())
    names = {n: n.replace(".default", "").replace(".modules_to_save", "")
             for n, _ in model.named_parameters()}
    trainable = {names[n] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= saved
    assert not saved & {names[n] for n, p in model.named_parameters()
                        if not p.requires_grad and ".snell_" not in n}


def test_resume_refuses_another_run(tmp_path):
    from upcycle.training.runs import prepare_checkpoints

    with pytest.raises(UpcycleError, match="no checkpoint to resume from"):
        prepare_checkpoints(tmp_path / "none", {"lr": 1}, resume=True)
    model = TUNERS["sherl"](tiny("bert"))
    from upcycle.training.config import TrainingConfig
    from upcycle.training.fit import fit

    fit(model, _features(_examples()), TrainingConfig(max_steps=2, batch_size=4, save_steps=1,
                                                      device="cpu", progress=False,
                                                      report_to=[]),
        output_dir=tmp_path / "ckpt", fingerprint={"lr": 0.01, "data": "a"})
    with pytest.raises(UpcycleError, match=r"another run \(lr: 0.01 in the checkpoint, 0.1 now"):
        prepare_checkpoints(tmp_path / "ckpt", {"lr": 0.1, "data": "a"}, resume=True)
    with pytest.raises(UpcycleError, match="holds checkpoints of an earlier run"):
        prepare_checkpoints(tmp_path / "ckpt", {"lr": 0.01, "data": "a"}, resume=None)
    found = prepare_checkpoints(tmp_path / "ckpt", {"lr": 0.01, "data": "a"}, resume=True)
    assert found.name == "checkpoint-2"


def test_cuda_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UpcycleError, match="--device cuda: CUDA is not available"):
        _fit(TUNERS["snell"](tiny("bert")), _features(_examples()), device="cuda")


def test_fp16_refused_on_cpu():
    with pytest.raises(UpcycleError, match="--fp16: float16 mixed precision needs a GPU"):
        _fit(TUNERS["snell"](tiny("bert")), _features(_examples()), fp16=True)


def test_bf16_autocast_trains_on_cpu_and_leaves_nothing_behind():
    model = TUNERS["snell"](tiny("bert"))
    result = _fit(model, _features(_examples()), bf16=True, max_steps=2)
    assert result.steps == 2 and all(math.isfinite(v) for v in result.step_losses)
    half = TUNERS["sherl"](tiny("bert")).bfloat16()  # bfloat16 weights, float32 master copies
    before = {n: p.detach().clone() for n, p in half.named_parameters() if p.requires_grad}
    _fit(half, _features(_examples()), bf16=True, max_steps=2)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert any(not torch.equal(p, before[n]) for n, p in half.named_parameters() if n in before)
    assert half(**inputs()).logits.dtype == torch.bfloat16
    # afterwards the model runs in float32 again, and a later float32 run is not autocast
    assert "forward" not in model.__dict__
    assert model(**inputs()).logits.dtype == torch.float32
    later = TUNERS["snell"](tiny("bert"))
    _fit(later, _features(_examples()), max_steps=1)
    assert "forward" not in later.__dict__ and "_original_forward" not in later.__dict__


def test_finetune_writes_a_loadable_folder(tmp_path):
    """The demo's fine-tunes: full fine-tuning through the bridge, saved atomically."""
    import json

    import numpy as np

    from upcycle.jobs.finetune import cached_record, finetune
    from upcycle.tasks import load_task
    from upcycle.training.config import TrainingConfig

    T = transformers
    model_dir = tmp_path / "vit"
    T.ViTModel(T.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32,
                           num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
               add_pooling_layer=False).save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 255, (12, 8, 8)).astype(np.uint8),
             labels=rng.integers(0, 3, 12))
    task = load_task(model_dir, tmp_path / "d.npz")
    data = task.read(tmp_path / "d.npz", fix_num_labels=True)
    config = TrainingConfig(max_steps=4, lr=1e-3, batch_size=4, eval_steps=2, device="cpu",
                            progress=False, report_to=[])
    record = finetune(task, data, tmp_path / "out", config=config, eval_data=data)
    assert record["steps"] == 4 and [e["step"] for e in record["evals"]] == [2, 4]
    assert all(0 <= e["eval_accuracy"] <= 1 for e in record["evals"])
    saved = json.loads((tmp_path / "out" / "train.json").read_text())
    assert saved["steps"] == 4
    assert cached_record(tmp_path / "out", {"lr": 1e-3, "seed": 0}) is not None
    again = T.ViTForImageClassification.from_pretrained(tmp_path / "out")
    assert again.config.num_labels == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "out", "vit"]

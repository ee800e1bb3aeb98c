"""MEHL on every device, resumable; the data-parallel share of loss targets; K = 1."""

import pytest
import torch
import torch.nn.functional as F
from test_soup import Net, loss_fn, make_data, write_ingredients
from torch import nn

from upcycle import UpcycleError
from upcycle.runtime import distributed
from upcycle.runtime.devices import available_devices
from upcycle.soup import MehlConfig, learned_soup, mehl_soup
from upcycle.soup.common import local_share
from upcycle.soup.resume import checkpoint_path

DEVICES = available_devices()


class Stop(Exception):
    pass


def _interrupt_after(r):
    def callback(record):
        if record["rounds_done"] == r:
            raise KeyboardInterrupt

    return callback


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stop_after", [1, 3])  # inside a pass, and at the end of one
def test_mehl_resume_equals_an_uninterrupted_run(tmp_path, device, stop_after):
    ings = write_ingredients(tmp_path / "ings", 5)
    data = make_data()
    cfg = MehlConfig(model_batch=2, epochs=2, lr=0.05, models_epochs=2, seed=4)
    whole = mehl_soup(ings, Net(), data, loss_fn=loss_fn, config=cfg, device=device)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        mehl_soup(ings, Net(), data, loss_fn=loss_fn, config=cfg, device=device,
                  checkpoint_dir=ckpt, callback=_interrupt_after(stop_after))
    assert checkpoint_path(ckpt).is_file()
    seen = []
    resumed = mehl_soup(ings, Net(), data, loss_fn=loss_fn, config=cfg, device=device,
                        checkpoint_dir=ckpt, resume=True, callback=seen.append)
    assert [r["rounds_done"] for r in seen] == list(range(stop_after + 1, 7))
    assert torch.allclose(resumed.coefficients, whole.coefficients, atol=1e-6, rtol=0)
    for k in whole.state:
        assert resumed.state[k].device.type == "cpu"
        assert torch.allclose(resumed.state[k].float(), whole.state[k].float(), atol=1e-6), k
    assert [h["ingredients"] for h in resumed.history] == [h["ingredients"] for h in whole.history]
    assert len(resumed.history) == 6


def test_resume_refuses_a_missing_or_foreign_checkpoint(tmp_path):
    ings = write_ingredients(tmp_path / "ings", 4)
    data = make_data()
    cfg = MehlConfig(model_batch=2, epochs=1, lr=0.05)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(UpcycleError, match="no MEHL checkpoint at .*ckpt"):
        mehl_soup(ings, Net(), data, loss_fn=loss_fn, config=cfg, checkpoint_dir=ckpt,
                  resume=True)
    with pytest.raises(UpcycleError, match="resume=True needs checkpoint_dir"):
        mehl_soup(ings, Net(), data, loss_fn=loss_fn, config=cfg, resume=True)
    with pytest.raises(KeyboardInterrupt):
        mehl_soup(ings, Net(), data, loss_fn=loss_fn, config=cfg, checkpoint_dir=ckpt,
                  callback=_interrupt_after(1))
    before = checkpoint_path(ckpt).read_bytes()
    cases = [
        (dict(ingredients=ings[:3]), "other ingredients \\(4 ingredients then, 3 now"),
        (dict(config=MehlConfig(model_batch=2, epochs=1, lr=0.05, blockwise=False)),
         "by method mehl\\+, not mehl"),
        (dict(config=MehlConfig(model_batch=2, epochs=2, lr=0.05)), "epochs was 1, now 2"),
        (dict(config=MehlConfig(model_batch=2, epochs=1, lr=0.05, seed=1)), "seed was 0, now 1"),
        (dict(held_out=make_data(seed=1)), "other held-out data"),
    ]
    for change, message in cases:
        kwargs = dict(ingredients=ings, held_out=data, config=cfg) | change
        with pytest.raises(UpcycleError, match=message):
            mehl_soup(kwargs["ingredients"], Net(), kwargs["held_out"], loss_fn=loss_fn,
                      config=kwargs["config"], checkpoint_dir=ckpt, resume=True)
    # an ingredient rewritten since the checkpoint
    import os

    os.utime(ings[2].path, ns=(1, 1))
    with pytest.raises(UpcycleError, match="ingredient 3 .* changed since the checkpoint"):
        mehl_soup(ings, Net(), data, loss_fn=loss_fn, config=cfg, checkpoint_dir=ckpt,
                  resume=True)
    assert checkpoint_path(ckpt).read_bytes() == before  # refused runs write nothing


def test_k1_first_round_is_centred_on_the_uniform_soup(tmp_path):
    ings = write_ingredients(tmp_path, 4, noise=0.5)
    data = make_data()
    soup = mehl_soup(ings, Net(), data, loss_fn=loss_fn,
                     config=MehlConfig(model_batch=1, epochs=2, lr=0.05))
    assert len(soup.history) == 4
    assert all(h["skipped_blocks"] == 0 for h in soup.history)  # no round is wasted
    C = soup.coefficients
    assert torch.allclose(C.sum(0), torch.ones(C.shape[1], dtype=torch.float64), atol=1e-9)
    # The first round moved away from the uniform soup: its ingredient's weight is not 1/N.
    first = soup.history[0]["ingredients"][0] - 1
    assert (C[first] - 0.25).abs().max() > 1e-4
    for name, _ in Net().named_parameters():
        col = soup.blocks.index(name)
        recon = sum(C[i, col] * ings[i].get(name).double() for i in range(4))
        assert torch.allclose(recon, soup.state[name].double(), atol=1e-5), name


@pytest.mark.parametrize("device", DEVICES)
def test_mehl_and_learned_run_on_every_device_and_agree_with_cpu(tmp_path, device):
    ings = write_ingredients(tmp_path, 4)
    data = make_data()
    cfg = MehlConfig(model_batch=2, epochs=2, lr=0.05)
    cpu = mehl_soup(ings, Net(), data, loss_fn=loss_fn, config=cfg, device="cpu")
    here = mehl_soup(ings, Net(), data, loss_fn=loss_fn, config=cfg, device=device)
    assert here.info["device"].startswith(device)
    assert torch.allclose(here.coefficients, cpu.coefficients, atol=1e-4)
    model = Net().to(device)  # device=None: where the model already is
    learned = learned_soup(ings, model, data, loss_fn=loss_fn)
    assert learned.info["device"].startswith(device)
    assert all(v.device.type == "cpu" for v in learned.state.values())


def test_bf16_ingredients_give_a_bf16_soup_unless_asked_and_compact_directions(tmp_path):
    ings = write_ingredients(tmp_path, 4, dtype=torch.bfloat16)
    data = make_data()
    cfg = MehlConfig(model_batch=2, epochs=2, lr=0.05)
    full = mehl_soup(ings, Net(), data, loss_fn=loss_fn, config=cfg)
    assert full.state["a.weight"].dtype == torch.bfloat16
    as32 = mehl_soup(ings, Net(), data, loss_fn=loss_fn, config=cfg, dtype=torch.float32)
    assert as32.state["a.weight"].dtype == torch.float32
    assert as32.state["count"].dtype == torch.long  # integers stay integers
    compact = mehl_soup(ings, Net(), data, loss_fn=loss_fn,
                        config=MehlConfig(model_batch=2, epochs=2, lr=0.05,
                                          compact_directions=True), dtype=torch.float32)
    # bf16 directions hold theta_i - c to bf16 rounding: the same soup to about 1e-2 relative.
    for k in ("a.weight", "b.weight"):
        assert torch.allclose(compact.state[k], as32.state[k], atol=2e-2), k
    assert torch.allclose(compact.coefficients, as32.coefficients, atol=2e-2)
    # bf16 autocast on the CPU runs and still fits.
    auto = mehl_soup(ings, Net(), data, loss_fn=loss_fn, config=cfg, precision="bf16")
    assert all(torch.isfinite(v.float()).all() for v in auto.state.values())
    with pytest.raises(UpcycleError, match="precision 'fp8'"):
        mehl_soup(ings, Net(), data, loss_fn=loss_fn, config=cfg, precision="fp8")


# -- the data-parallel share of loss targets --------------------------------------------------

def _fake_world(monkeypatch, rank, world):
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: world)


def test_classification_share_is_rows_and_empty_ranks_get_a_zero_share(monkeypatch):
    batch = {"x": torch.randn(5, 8), "labels": torch.tensor([0, 1, 2, 1, 0])}
    shares = []
    for r in range(3):
        _fake_world(monkeypatch, r, 3)
        local, share = local_share(batch)
        shares.append(share)
        assert len(local["labels"]) == [1, 2, 2][r]
    assert shares == pytest.approx([0.2, 0.4, 0.4])
    one = {"x": torch.randn(1, 8), "labels": torch.tensor([2])}
    _fake_world(monkeypatch, 0, 2)
    local, share = local_share(one)  # no rows here: a stand-in row that adds zero
    assert share == 0.0 and len(local["labels"]) == 1
    _fake_world(monkeypatch, 1, 2)
    assert local_share(one)[1] == 1.0


class TinyLM(nn.Module):
    def __init__(self, vocab=11):
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, vocab)

    def forward(self, input_ids):
        return self.head(self.emb(input_ids))


def token_mean_loss(model, batch):
    """The HF causal-LM loss: mean over the shifted, non-ignored target tokens."""
    logits = model(batch["input_ids"])[:, :-1]
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100)


def test_causal_lm_share_is_the_share_of_target_tokens(monkeypatch):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (5, 7), generator=g)
    labels = ids.clone()
    labels[0, 3:] = -100  # padding: rows hold 3, 6, 6, 1 and 0 targets after the shift
    labels[3, 2:] = -100
    labels[4, 1:] = -100
    batch = {"input_ids": ids, "labels": labels}
    model = TinyLM()
    with torch.no_grad():
        global_mean = float(token_mean_loss(model, batch))
        for world in (2, 3, 5, 7):
            total, shares = 0.0, 0.0
            for r in range(world):
                _fake_world(monkeypatch, r, world)
                local, share = local_share(batch)
                loss = token_mean_loss(model, local)
                assert torch.isfinite(loss), (world, r)  # stand-in rows hold a target
                total += float(loss) * share
                shares += share
            assert shares == pytest.approx(1.0)
            assert total == pytest.approx(global_mean, rel=1e-6), world
    _fake_world(monkeypatch, 0, 2)
    assert local_share({"input_ids": ids, "labels": torch.full_like(ids, -100)}) == (None, 0.0)


@pytest.mark.parametrize("grad_clip", [None, 0.5])
def test_fp16_loss_scaling_is_undone_exactly(tmp_path, grad_clip):
    """fp16 autocast multiplies the loss by the scaler's scale (65536): the coefficient
    gradient and the clip norm must be unscaled, so the soup matches the fp32 one closely.
    (Runs on the CPU through the API; the CLI allows --fp16 on GPUs only.)"""
    ings = write_ingredients(tmp_path, 4)
    cfg = MehlConfig(model_batch=2, epochs=2, lr=0.05, grad_clip=grad_clip)
    fp32 = mehl_soup(ings, Net(), make_data(), loss_fn=loss_fn, config=cfg)
    fp16 = mehl_soup(ings, Net(), make_data(), loss_fn=loss_fn, config=cfg, precision="fp16")
    # (unscaled: within fp16 noise; a scale left in would be off by orders of magnitude)
    assert torch.allclose(fp16.coefficients, fp32.coefficients, atol=3e-2)
    learned32 = learned_soup(ings, Net(), make_data(), loss_fn=loss_fn)
    learned16 = learned_soup(ings, Net(), make_data(), loss_fn=loss_fn, precision="fp16")
    assert torch.allclose(learned16.coefficients, learned32.coefficients, atol=2e-3)

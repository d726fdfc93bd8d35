"""The training engine: precision decisions, the LR schedule (once per optimiser step, however many ranks
Accelerate counts), gradient accumulation, the loop's logs, checkpoints and resume, and the launch configs
(multi-node command, packaging extras)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mgfm.train.engine import Engine, MicroResult, Schedule, lr_lambda, resolve_precision, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps its state in a process-wide singleton; each test here starts from none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _recipe(grad_accum: int = 1, precision: str = "no", **extra) -> SimpleNamespace:
    optim = SimpleNamespace(grad_accum=grad_accum, clip_grad=1.0, betas=(0.9, 0.95), base_lr=1e-3, min_lr=1e-6,
                            warmup_epochs=1, epochs=4)
    return SimpleNamespace(mixed_precision=precision, zero_stage=0, resume="auto", checkpoint_every=0,
                           keep_checkpoints=2, optim=optim, stream=SimpleNamespace(batch_size=2), **extra)


# ------------------------------------------------------------------------------------------ schedule


def test_lr_lambda_warms_up_linearly_then_follows_the_cosine_down():
    factor = lr_lambda(total_steps=110, warmup_steps=10, min_ratio=0.01)
    assert [factor(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx((1 + 0.01) / 2)  # half way through the decay
    assert factor(35) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert factor(110) == pytest.approx(0.01) and factor(500) == pytest.approx(0.01)
    decay = [factor(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:])), "the lr must only fall after warmup"


def test_schedule_scales_the_peak_lr_with_the_global_batch():
    optim = _recipe().optim
    schedule = Schedule.for_run(optim, steps_per_epoch=5, global_batch=512)
    assert schedule.peak_lr == pytest.approx(2e-3) and schedule.total_steps == 20 and schedule.warmup_steps == 5
    assert schedule.lr(4) == pytest.approx(2e-3) and schedule.lr(20) == pytest.approx(1e-6)


def test_lr_steps_once_per_optimizer_step_however_many_ranks_accelerate_counts(fresh_accelerate):
    # On 8 GPUs Accelerate reports num_processes=8, and its scheduler wrapper would step the LambdaLR 8 times
    # per optimiser step: the whole schedule would run 8x too fast. The engine steps it once.
    from accelerate.state import AcceleratorState

    engine = Engine(_recipe())
    AcceleratorState().num_processes = 8
    model = torch.nn.Linear(4, 2)
    schedule = Schedule(total_steps=40, steps_per_epoch=10, warmup_steps=5, peak_lr=1e-3, min_lr=1e-6)
    engine.prepare(model, [{"params": list(model.parameters())}], schedule)
    for step in range(40):
        with engine.accelerator.accumulate(engine.model):
            engine.step(engine.model(torch.randn(3, 4)).pow(2).mean(), step)
        assert engine.lr == pytest.approx(schedule.lr(step + 1)), f"after step {step + 1}"


def test_gradient_accumulation_steps_the_optimizer_and_the_lr_once_per_accumulation(fresh_accelerate):
    engine = Engine(_recipe(grad_accum=3))
    model = torch.nn.Linear(4, 2)
    schedule = Schedule(total_steps=4, steps_per_epoch=4, warmup_steps=2, peak_lr=1e-2, min_lr=1e-6)
    engine.prepare(model, [{"params": list(model.parameters())}], schedule)
    weights = [engine.model.weight.detach().clone()]
    for micro in range(12):
        with engine.accelerator.accumulate(engine.model):
            engine.step(engine.model(torch.randn(3, 4)).pow(2).mean(), micro // 3)
        weights.append(engine.model.weight.detach().clone())
        if micro % 3 < 2:
            assert torch.equal(weights[-1], weights[-2]), f"micro-batch {micro} stepped the optimiser"
        else:
            assert not torch.equal(weights[-1], weights[-2])
            assert engine.lr == pytest.approx(schedule.lr(micro // 3 + 1))


def test_layer_scaled_groups_start_at_their_share_of_the_peak(fresh_accelerate):
    engine = Engine(_recipe())
    low, high = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    schedule = Schedule(total_steps=10, steps_per_epoch=10, warmup_steps=0, peak_lr=1.0, min_lr=1e-6)
    engine.prepare(torch.nn.Sequential(low, high), [{"params": list(low.parameters()), "lr_scale": 0.25},
                                                   {"params": list(high.parameters()), "lr_scale": 1.0}], schedule)
    assert [g["lr"] for g in engine.optimizer.param_groups] == pytest.approx([0.25, 1.0])
    assert engine.lr == pytest.approx(1.0)


def test_non_finite_loss_stops_with_the_step(fresh_accelerate):
    engine = Engine(_recipe())
    model = torch.nn.Linear(2, 1)
    engine.prepare(model, [{"params": list(model.parameters())}], Schedule(4, 4, 0, 1e-3, 1e-6))
    with pytest.raises(FloatingPointError, match="at step 7"):
        with engine.accelerator.accumulate(engine.model):
            engine.step(torch.tensor(float("nan"), requires_grad=True), 7)


# ------------------------------------------------------------------------------------------ the loop


def _toy_run(tmp_path: Path, total: int, checkpoint_every: int, stop_after: int | None = None):
    """Fit y = 2x with the engine's loop; with ``stop_after`` the data runs out after that many steps
    (a run killed there)."""
    engine = Engine(_recipe())
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    schedule = Schedule(total_steps=total, steps_per_epoch=5, warmup_steps=2, peak_lr=0.1, min_lr=1e-4)
    engine.prepare(model, [{"params": list(model.parameters())}], schedule)
    start = engine.resume(sorted((tmp_path / "ckpt").glob("step_*"))[-1] if (tmp_path / "ckpt").exists() else None)

    def batches():
        for step in range(start, stop_after or total):
            x = torch.linspace(-1, 1, 8)[:, None] + step / 100
            yield x, 2 * x

    def loss_fn(batch, step):
        x, y = batch
        return MicroResult(torch.nn.functional.mse_loss(engine.model(x), y), {"seen": float(step)}, clips=len(x))

    history = train(engine, batches(), loss_fn, start, tmp_path / "ckpt", tmp_path, checkpoint_every, "toy")
    return engine, start, history


def test_train_logs_every_step_checkpoints_and_resumes_without_gap_or_repeat(tmp_path, fresh_accelerate):
    with pytest.raises(RuntimeError, match="the training data ended at step 7 of 10"):
        _toy_run(tmp_path, total=10, checkpoint_every=3, stop_after=7)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_00000003", "step_00000006"]
    assert json.loads((tmp_path / "ckpt" / "step_00000006" / "meta.json").read_text())["epoch"] == 1

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    engine, start, history = _toy_run(tmp_path, total=10, checkpoint_every=3)
    assert start == 6
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11)), "step 7 of the killed run is dropped, then redone"
    assert [r["seen"] for r in rows] == [float(s) for s in range(10)]
    schedule = engine.schedule
    assert [r["lr"] for r in rows] == pytest.approx([schedule.lr(s) for s in range(1, 11)])
    assert list(tmp_path.glob("tensorboard/events.out.tfevents.*"))
    assert (tmp_path / "ckpt" / "step_00000010").is_dir()
    assert history[-1]["loss"] < rows[0]["loss"]
    state = engine.full_state_dict()
    assert state["weight"].dtype == torch.float32 and state["weight"].device.type == "cpu"


# ------------------------------------------------------------------------------------------ precision


def test_auto_precision_is_bf16_only_where_the_gpu_has_it_natively(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # a V100 / T4: bf16 only by emulation (torch counts it unless including_emulation=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto", launcher="no") == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # A100 / H100
    assert resolve_precision("auto", launcher="no") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto", launcher="no") == "no"


def test_the_recipe_precision_holds_under_the_launcher(caplog):
    # `accelerate launch` exports ACCELERATE_MIXED_PRECISION=no when nothing was asked: it must not win
    assert resolve_precision("bf16", launcher="no") == "bf16"
    assert resolve_precision("auto", launcher="bf16") == "bf16"  # an explicit launcher choice fills "auto"
    assert resolve_precision("no", launcher="bf16") == "no" and "recipe's mixed_precision=no" in caplog.text
    from mgfm.config import RecipeError

    with pytest.raises(RecipeError, match="mixed_precision: expected one of"):
        resolve_precision("fp32x", launcher="no")


def test_fp32_on_cuda_uses_tf32_matmuls(monkeypatch):
    from mgfm.train.engine import configure_matmul

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert not configure_matmul("bf16") and not torch.backends.cuda.matmul.allow_tf32
        assert configure_matmul("no")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_cpu_bf16_without_deepspeed_is_autocast_over_fp32_weights(fresh_accelerate):
    engine = Engine(_recipe(precision="bf16"))
    model = torch.nn.Linear(4, 2)
    engine.prepare(model, [{"params": list(model.parameters())}], Schedule(2, 2, 0, 1e-3, 1e-6))
    assert engine.precision == "bf16" and engine.weights_dtype == torch.float32
    x = engine.inputs(torch.randn(3, 4))
    out = engine.model(x)  # Accelerate hands the output back as fp32; its values were computed in bf16
    assert x.dtype == torch.float32 and torch.equal(out.bfloat16().float(), out)
    assert engine.inputs(torch.zeros(3, dtype=torch.long)).dtype == torch.long


def test_inputs_follow_bf16_weights():
    from mgfm.train.engine import to_model

    model = torch.nn.Linear(4, 2).to(torch.bfloat16)  # what DeepSpeed bf16 makes of a model
    assert to_model(torch.randn(2, 4), model, "cpu").dtype == torch.bfloat16
    assert to_model(torch.ones(2, dtype=torch.bool), model, "cpu").dtype == torch.bool


# ------------------------------------------------------------------------------------------ launch configs


def test_multi_node_config_launches_one_torchrun_per_node_with_the_given_master(monkeypatch):
    # accelerate's own command builder, reached the way `accelerate launch` reaches it: without
    # `deepspeed_multinode_launcher: standard` it builds a pdsh command with no hostfile, and DeepSpeed then
    # trains each node alone on 127.0.0.1
    import accelerate.commands.launch as launch
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    built = {}

    def capture(args):
        built["cmd"], built["env"] = prepare_deepspeed_cmd_env(args)
        built["args"] = args

    monkeypatch.setattr(launch, "deepspeed_launcher", capture)
    launch.launch_command(launch.launch_command_parser().parse_args(
        ["--config_file", str(REPO / "recipes/accelerate/multi_node.yaml"), "--machine_rank", "1", "pretrain.py"]))
    cmd, env, args = built["cmd"], built["env"], built["args"]
    assert cmd is None, f"a {cmd[:3]} command instead of torchrun"
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    # torchrun's rendezvous: the rank-0 node's address (static backend = it is the master)
    assert args.rdzv_endpoint == "10.0.0.1:29500" and args.rdzv_backend == "static"
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"].endswith("recipes/deepspeed/zero2.json")


def test_gpu_accelerate_configs_ask_for_bf16():
    import yaml

    for name in ("multi_gpu_zero2.yaml", "multi_node.yaml"):
        config = yaml.safe_load((REPO / "recipes" / "accelerate" / name).read_text())
        assert config["mixed_precision"] == "bf16", name


def test_each_faiss_extra_installs_exactly_one_faiss():
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = [Requirement(r) for r in project["dependencies"]]
    extras = project["optional-dependencies"]
    for extra in ("cpu", "gpu"):
        wanted = [Requirement(r) for r in extras[extra]] + base
        chosen = [r.name for r in wanted if r.name.startswith("faiss")
                  and (r.marker is None or r.marker.evaluate({"extra": extra}))]
        assert len(chosen) == 1, f"[{extra}] installs {chosen}"
    assert not [r for r in base if r.name.startswith("faiss")], "the base install must not pick a faiss build"


# ------------------------------------------------------------------------------------------ on a GPU


@pytest.mark.gpu
def test_bf16_step_on_cuda_keeps_fp32_weights_and_follows_the_schedule(fresh_accelerate):
    engine = Engine(_recipe(precision="auto"))
    assert engine.device.type == "cuda" and engine.precision in ("bf16", "no")
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    schedule = Schedule(total_steps=20, steps_per_epoch=10, warmup_steps=2, peak_lr=1e-3, min_lr=1e-6)
    engine.prepare(model, [{"params": list(model.parameters())}], schedule)
    losses = []
    for step in range(20):
        x = engine.inputs(torch.randn(32, 64))
        with engine.accelerator.accumulate(engine.model):
            loss = (engine.model(x).float() - x.sum(1, keepdim=True)).pow(2).mean()
            engine.step(loss, step)
        losses.append(loss.item())
        assert engine.lr == pytest.approx(schedule.lr(step + 1))
    state = engine.full_state_dict()
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())
    assert losses[-1] < losses[0]

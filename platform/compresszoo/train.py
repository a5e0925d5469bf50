"""Distributed training of one zoo model on Ray Train, and the driver around it.

Per worker: train() -> train_step() -> forward_backward(), with a small explicit state
(step, epoch, data positions, RNG, best validation loss, the lr schedule). The driver (fit)
pins the warm-start parent, builds the TorchTrainer with a deterministic run name under
`storage`, so a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import TrainConfig
from .models.io import WEIGHTS_FILE
from .models.loss import RateDistortionLoss, psnr_from_mse
from .models.registry import build

STATE_FILE, OPTIM_FILE = "state.json", "optim.pt"


class WarmStartError(ValueError):
    """A warm-start parent that cannot be used; the message names it and the fix."""


@dataclass
class TrainState:
    step: int = 0
    best_val_loss: float = math.inf
    val_loss: float = math.inf
    data_positions: list = field(default_factory=list)
    rng: list = field(default_factory=list)  # per-rank torch RNG states (as lists of ints)
    py_rng: list = field(default_factory=list)
    schedule: dict = field(default_factory=dict)  # LrSchedule's fields


def steps_per_epoch(train_frames: int, batch_size: int) -> int:
    """One epoch of the training split in steps of the global batch: ceil(frames / batch),
    as examples/train.py's DataLoader (no drop_last) counts it."""
    if train_frames <= 0 or batch_size <= 0:
        raise ValueError(f"an epoch needs training frames and a batch: got {train_frames} frames, batch {batch_size}")
    return -(-train_frames // batch_size)


@dataclass
class LrSchedule:
    """The documented learning-rate schedule, as a small pure state machine.

    CompressAI's zoo (docs/source/zoo.rst, "Training"): lr held for the first ~1-2M steps
    (constant_steps), then "divided by 2 when the evaluation loss reaches a plateau (we use a
    patience of 20 epochs)" with PyTorch's ReduceLROnPlateau. observe() is called at the end
    of every epoch (epoch_steps steps) with the loss over the test split:

    - while step <= constant_steps the lr never changes, whatever the losses;
    - the plateau phase starts like a fresh ReduceLROnPlateau (mode "min", its defaults:
      relative threshold 1e-4, no cooldown): a loss below best * (1 - threshold) is an
      improvement; the epoch that finds `patience` epochs without one already behind it
      multiplies lr by `factor` and starts counting again;
    - no floor unless min_lr > 0 (the docs give none).

    The state is plain numbers, saved with every checkpoint (TrainState.schedule).
    """

    lr: float
    constant_steps: int
    epoch_steps: int
    patience: int
    factor: float = 0.5
    min_lr: float = 0.0
    threshold: float = 1e-4
    best: float = math.inf
    epochs_since_best: int = 0
    phase: str = "constant"  # "constant" or "plateau"
    last_step: int = 0  # the step of the last observation: an epoch is counted once

    @classmethod
    def from_config(cls, cfg: TrainConfig, epoch_steps: int) -> LrSchedule:
        return cls(lr=cfg.lr, constant_steps=cfg.constant_lr_steps, epoch_steps=epoch_steps,
                   patience=cfg.plateau_patience, factor=cfg.plateau_factor, min_lr=cfg.min_lr)

    def is_epoch_end(self, step: int) -> bool:
        return self.epoch_steps > 0 and step > 0 and step % self.epoch_steps == 0

    def observe(self, step: int, loss: float) -> float:
        """Take the end-of-epoch test loss at `step`; return the lr for the steps after it."""
        if step <= self.last_step:
            raise ValueError(f"schedule: step {step} was already counted (last epoch end at {self.last_step})")
        self.last_step = step
        if step <= self.constant_steps:
            return self.lr
        self.phase = "plateau"
        if loss < self.best * (1 - self.threshold):
            self.best, self.epochs_since_best = loss, 0
        else:
            self.epochs_since_best += 1
            if self.epochs_since_best > self.patience:
                self.lr = max(self.lr * self.factor, self.min_lr)
                self.epochs_since_best = 0
        return self.lr


@dataclass(frozen=True)
class Parent:
    """A warm-start parent pinned by the driver: `ref` is NAME:VERSION or a weights file."""

    ref: str
    name: str  # registry name (for a file: the name its spec would register under)
    version: str  # "" for a file
    sha256: str  # of the weights file

    def tags(self) -> dict:
        return {"parent.ref": self.ref, "parent.name": self.name, "parent.version": self.version,
                "parent.weights_sha256": self.sha256}


def _is_path(ref: str) -> bool:
    # registry names are [A-Za-z0-9._-]: a slash or the weights suffix can only be a path
    return "/" in ref or ref.endswith(".safetensors") or os.path.exists(ref)


def _weights_path(ref: str) -> Path:
    p = Path(ref).expanduser().resolve()
    return p / WEIGHTS_FILE if p.is_dir() else p


def resolve_parent(cfg: TrainConfig) -> tuple[TrainConfig, Parent | None]:
    """(cfg with init_from pinned, the parent) or (cfg, None) without a warm start.

    An alias is resolved once, here, to NAME:VERSION: the run's identity names the version
    it started from, and every worker loads that same version even if the alias moves.
    """
    ref = cfg.parent_ref()
    if not ref:
        return cfg, None
    from . import registry_client
    from .models.io import read_metadata
    from .models.registry import spec_from_dict

    if _is_path(ref):
        path = _weights_path(ref)
        if not path.is_file():
            raise WarmStartError(f"init_from={ref!r}: no {WEIGHTS_FILE} at {path}; give a checkpoint folder "
                                 "or .safetensors file (readable by every worker) or NAME@ALIAS")
        pinned, name, version, digest = str(path), "", "", registry_client.sha256_file(path)
    else:
        name, alias, version = registry_client.parse_ref(ref)
        registry_client.download(ref, cfg.tracking_uri)  # existence, with the registry's own errors
        if not version:
            from .tracking import client

            alias = alias or registry_client.CHAMPION
            c = client(cfg.tracking_uri)
            version = c.get_registered_model(name).aliases.get(alias) or c.get_model_version_by_alias(
                name, alias).version
        pinned = f"{name}:{version}"
        path = registry_client.download(pinned, cfg.tracking_uri)  # verified against its sha256 tag
        digest = registry_client.sha256_file(path)
    try:
        spec = spec_from_dict(json.loads(read_metadata(path).get("spec", "null")))
    except Exception as e:  # noqa: BLE001 - not a compresszoo weights file, whatever the cause
        raise WarmStartError(f"init_from={ref!r}: {path} is not a compresszoo weights file ({e})") from None
    _check_compatible(ref, spec, cfg.spec())
    parent = Parent(pinned, name or spec.registry_name, str(version), digest)
    return dataclasses.replace(cfg, init_from=pinned), parent


def _check_compatible(ref: str, parent, child) -> None:
    if (parent.architecture, parent.N, parent.M) != (child.architecture, child.N, child.M):
        raise WarmStartError(
            f"init_from={ref!r} is {parent.architecture} N={parent.N} M={parent.M}; this run trains "
            f"{child.architecture} N={child.N} M={child.M}: start from a model of the same architecture and channels")


# ------------------------------------------------------------------ worker side


class Trainer:
    """Everything one worker holds; train() is the loop."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, device: torch.device, run_id: str | None):
        from .tracking import make_logger

        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        spec = cfg.spec()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = build(spec).to(device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.criterion = RateDistortionLoss(spec.lmbda, spec.metric)
        self.optimizer = torch.optim.Adam(self.model.main_parameters(), lr=cfg.lr)
        self.aux_optimizer = torch.optim.Adam(self.model.aux_parameters(), lr=cfg.aux_lr)
        # epoch_steps comes from the dataset's manifest when train() starts
        self.schedule = LrSchedule.from_config(cfg, epoch_steps=0)
        self.state = TrainState()
        self._val_batches: list | None = None
        self.logger = make_logger(rank, cfg.tracking_uri, run_id)
        torch.manual_seed(cfg.seed * 1_000_003 + rank)  # per-rank noise from here on
        random.seed(cfg.seed * 1_000_003 + rank)

    # -- checkpoints -----------------------------------------------------------------
    def load(self, directory: str) -> None:
        from safetensors.torch import load_file

        d = Path(directory)
        self.model.load_state_dict(load_file(str(d / WEIGHTS_FILE), device=str(self.device)), strict=True)
        optim = torch.load(d / OPTIM_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(optim["optimizer"])
        self.aux_optimizer.load_state_dict(optim["aux_optimizer"])
        self.state = TrainState(**json.loads((d / STATE_FILE).read_text()))
        if self.state.schedule:
            self.schedule = LrSchedule(**self.state.schedule)
            self._set_lr(self.schedule.lr)
        if len(self.state.rng) == self.world:
            torch.set_rng_state(torch.tensor(self.state.rng[self.rank], dtype=torch.uint8))
            random.setstate(_to_tuple(self.state.py_rng[self.rank]))

    def save(self, directory: str) -> None:
        from .models.io import save_weights

        d = Path(directory)
        save_weights(self.model, d / WEIGHTS_FILE, extra={"step": self.state.step})
        torch.save({"optimizer": self.optimizer.state_dict(),
                    "aux_optimizer": self.aux_optimizer.state_dict()}, d / OPTIM_FILE)
        self.state.schedule = asdict(self.schedule)
        (d / STATE_FILE).write_text(json.dumps(self.state.__dict__))

    def warm_start(self, parent: Parent) -> None:
        """Start from the parent's weights (all of them, entropy-model buffers included) with
        fresh optimizers at this config's rates: the documented fine-tune. The bytes loaded
        are hashed against the sha256 the driver pinned."""
        from . import registry_client
        from .models.io import load_weights

        if _is_path(parent.ref):
            with tempfile.TemporaryDirectory(prefix="compresszoo-parent-") as tmp:
                private = Path(tmp) / WEIGHTS_FILE  # hash the very bytes loaded
                shutil.copyfile(_weights_path(parent.ref), private)
                got = registry_client.sha256_file(private)
                if got != parent.sha256:
                    raise WarmStartError(f"init_from={parent.ref!r} changed after the run started (sha256 "
                                         f"{got[:12]}, pinned {parent.sha256[:12]}); rerun to pin it again")
                model = load_weights(private)
        else:
            model = registry_client.load_registered(parent.ref, self.cfg.tracking_uri)
        from .models.registry import spec_of

        _check_compatible(parent.ref, spec_of(model), self.cfg.spec())
        self.model.load_state_dict(model.state_dict(), strict=True)

    # -- the loop ------------------------------------------------------------------------
    def train(self, stream) -> None:
        import ray.train

        cfg = self.cfg
        self.schedule.epoch_steps = steps_per_epoch(stream.manifest.frames("train"), cfg.batch_size)
        net = self._parallel()
        t_last, images_since = time.perf_counter(), 0
        while self.state.step < cfg.max_steps:
            for batch in stream.epoch_batches():
                metrics = self.train_step(net, batch.to(self.device, non_blocking=True))
                self.state.step += 1
                images_since += batch.shape[0] * self.world
                step = self.state.step
                if step % cfg.log_every == 0:
                    now = time.perf_counter()
                    metrics["images_per_second"] = images_since / max(now - t_last, 1e-9)
                    metrics["lr"] = self.optimizer.param_groups[0]["lr"]
                    t_last, images_since = now, 0
                    self.logger.log_metrics(metrics, step)
                if self.schedule.is_epoch_end(step):
                    self.end_epoch()
                elif (cfg.val_every and step % cfg.val_every == 0) or step == cfg.max_steps:
                    self.validate()
                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                    self.checkpoint(stream, ray.train, metrics)
                _maybe_inject_fault(step, self.rank)
                if step >= cfg.max_steps:
                    break
            else:
                continue
            break
        self.logger.log_metrics({f"data_{k}": v for k, v in stream.stats().items()
                                 if isinstance(v, (int, float))}, self.state.step)

    def train_step(self, net, x: torch.Tensor) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        self.aux_optimizer.zero_grad(set_to_none=True)
        out = self.forward_backward(net, x)
        if not torch.isfinite(out["loss"]):
            raise FloatingPointError(
                f"{self.cfg.run_name()}: the loss became {out['loss'].item()} at step {self.state.step + 1}; "
                f"lower lr (now {self.optimizer.param_groups[0]['lr']:g}) or check the data")
        torch.nn.utils.clip_grad_norm_(self.model.main_parameters(), self.cfg.clip_max_norm)
        self.optimizer.step()
        aux = self.model.aux_loss()  # data-free: identical on every rank, no all-reduce needed
        aux.backward()
        self.aux_optimizer.step()
        return {"loss": out["loss"].item(), "bpp": out["bpp_loss"].item(),
                "mse": out["mse_loss"].item(), "psnr": psnr_from_mse(out["mse_loss"].item()),
                "aux_loss": aux.item()}

    def forward_backward(self, net, x: torch.Tensor) -> dict:
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            output = net(x)
        output["x_hat"] = output["x_hat"].float()
        output["likelihoods"] = {k: v.float() for k, v in output["likelihoods"].items()}
        losses = self.criterion(output, x)
        losses["loss"].backward()
        return losses

    @torch.no_grad()
    def validate(self) -> float:
        from .data.reader import validation_batches

        if self._val_batches is None:  # fixed center crops: read once, keep in memory
            self._val_batches = list(validation_batches(
                self.cfg.data, crop=self.cfg.val_crop, batch_size=4, rank=self.rank,
                world_size=self.world, limit=self.cfg.val_images or None, task_cpus=self.cfg.data_cpus))
        self.model.eval()
        total = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, bpp, mse, n
        for x in self._val_batches:
            x = x.to(self.device)
            out = self.criterion(self.model(x), x)
            n = x.shape[0]
            total += torch.tensor([out["loss"].item() * n, out["bpp_loss"].item() * n,
                                   out["mse_loss"].item() * n, n], dtype=torch.float64, device=self.device)
        self.model.train()
        if self.world > 1:
            torch.distributed.all_reduce(total)
        n = max(total[3].item(), 1.0)
        val = total[0].item() / n
        self.state.val_loss = val
        self.state.best_val_loss = min(self.state.best_val_loss, val)
        self.logger.log_metrics({"val_loss": val, "val_bpp": total[1].item() / n,
                                 "val_mse": total[2].item() / n, "val_psnr": psnr_from_mse(total[2].item() / n),
                                 "lr": self.optimizer.param_groups[0]["lr"]}, self.state.step)
        return val

    def end_epoch(self) -> float:
        """Validate and give the loss to the schedule (which may halve the main lr)."""
        val = self.validate()
        lr = self.schedule.observe(self.state.step, val)
        self._set_lr(lr)
        self.logger.log_metrics({"lr_after_epoch": lr, "plateau_epochs_since_best": self.schedule.epochs_since_best},
                                self.state.step)
        return val

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:  # the main optimizer only, as documented
            group["lr"] = lr

    def checkpoint(self, stream, train_api, metrics: dict) -> None:
        self.state.data_positions = _gather(stream.position(), self.world)
        self.state.rng = _gather(torch.get_rng_state().tolist(), self.world)
        self.state.py_rng = _gather(_to_list(random.getstate()), self.world)
        report = {"step": self.state.step, "val_loss": self.state.val_loss, **metrics}
        if self.rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                self.save(tmp)
                train_api.report(report, checkpoint=train_api.Checkpoint.from_directory(tmp))
        else:
            train_api.report(report, checkpoint=None)

    def _parallel(self):
        net = self._ddp()
        if self.cfg.compile and self.device.type == "cuda":
            # Compile the DDP-wrapped module so graph breaks line up with bucket boundaries.
            net = torch.compile(net)
        return net

    def _ddp(self):
        if self.world == 1:
            return self.model
        from torch.nn.parallel import DistributedDataParallel as DDP

        # The quantiles are trained by the aux loss alone, outside DDP's forward/backward:
        # DDP must not wait for their gradients. Every rank computes the same aux gradient.
        DDP._set_params_and_buffers_to_ignore_for_model(
            self.model, [n for n, _ in self.model.named_parameters() if n.endswith("quantiles")])
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(self.model, device_ids=ids, broadcast_buffers=False)


def train_loop_per_worker(config: dict) -> None:
    """The function Ray Train runs on every worker."""
    import ray.train
    import ray.train.torch

    from .data.reader import TrainStream

    cfg = TrainConfig.from_dict(config["train"])
    _quiet_ray_data()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    if os.environ.get("COMPRESSZOO_PID_DIR"):
        Path(os.environ["COMPRESSZOO_PID_DIR"], f"rank{rank}.pid").write_text(str(os.getpid()))
    trainer = Trainer(cfg, rank, world, device, config.get("mlflow_run_id"))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            trainer.load(d)
    elif config.get("parent"):
        trainer.warm_start(Parent(**config["parent"]))
    positions = trainer.state.data_positions or None
    stream = TrainStream(cfg.data, rank=rank, world_size=world, batch_size=cfg.batch_size // world,
                         crop=cfg.crop, seed=cfg.seed, position=positions,
                         shuffle_buffer=cfg.shuffle_buffer, task_cpus=cfg.data_cpus)
    if rank == 0 and trainer.state.step == 0:
        trainer.logger.log_params(cfg.to_dict())
    trainer.train(stream)


# ------------------------------------------------------------------ driver side


@dataclass
class FitResult:
    config: TrainConfig
    run_name: str
    mlflow_run_id: str
    checkpoint_dir: str  # a local copy of the final checkpoint
    steps: int
    val_loss: float


def fit(cfg: TrainConfig, *, callbacks: list | None = None, storage: str | None = None,
        mlflow_parent_run_id: str | None = None) -> FitResult:
    """Train one model (resuming its run if it exists) and return its final checkpoint.

    callbacks: Ray Train UserCallbacks (a Tune sweep passes its report callback here);
    storage: overrides cfg.storage for where Ray keeps the run; mlflow_parent_run_id nests
    this run's MLflow run under a sweep's parent run.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .storage import ray_storage
    from .tracking import find_or_create_run, provenance_tags

    cfg, parent = resolve_parent(cfg.resolved())
    if not ray.is_initialized():
        ray.init()
    _quiet_ray_data()
    name = cfg.run_name()
    tags = {**provenance_tags(), "git_commit": cfg.git_commit, "compresszoo.config_hash": cfg.config_hash()}
    if mlflow_parent_run_id:
        tags["mlflow.parentRunId"] = mlflow_parent_run_id
    if parent:
        tags.update(parent.tags())  # lineage; the pinned ref is also the init_from param
    run_id = find_or_create_run(cfg.tracking_uri, cfg.experiment, name, tags)
    path, fs = ray_storage(storage or cfg.storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.to_dict(), "mlflow_run_id": run_id,
                           "parent": asdict(parent) if parent else None},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=name, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": _forwarded_env()},
            callbacks=callbacks or None,
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {name} finished without a checkpoint; see the Ray logs under {cfg.storage}")
    local = tempfile.mkdtemp(prefix="compresszoo-ckpt-")
    result.checkpoint.to_directory(local)
    state = json.loads(Path(local, STATE_FILE).read_text())
    return FitResult(cfg, name, run_id, local, state["step"], state["best_val_loss"])


def _forwarded_env() -> dict:
    """Non-secret settings the workers need (S3 endpoint, region, test hooks).

    Credentials are never put in the runtime env (Ray stores it with the job and shows it
    in the dashboard): nodes get them from their own environment or the platform's secrets.
    """
    keys = ("AWS_ENDPOINT_URL", "COMPRESSZOO_S3_ENDPOINT", "AWS_REGION", "AWS_DEFAULT_REGION",
            "AWS_EC2_METADATA_DISABLED", "MLFLOW_S3_ENDPOINT_URL",
            "COMPRESSZOO_PID_DIR", "COMPRESSZOO_FAULT_AT_STEP", "COMPRESSZOO_FAULT_MARKER")
    return {k: os.environ[k] for k in keys if k in os.environ}


# ------------------------------------------------------------------ helpers


def _quiet_ray_data() -> None:
    """Ray Data logs every small per-epoch dataset at INFO; training logs are what matter here."""
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _maybe_inject_fault(step: int, rank: int) -> None:
    """Test hook: SIGKILL this worker once at a given step (a real process death)."""
    at, marker = os.environ.get("COMPRESSZOO_FAULT_AT_STEP"), os.environ.get("COMPRESSZOO_FAULT_MARKER")
    if at and marker and rank == 0 and step == int(at) and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), 9)


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _to_list(obj):
    return [_to_list(o) for o in obj] if isinstance(obj, (tuple, list)) else obj


def _to_tuple(obj):
    return tuple(_to_tuple(o) for o in obj) if isinstance(obj, list) else obj

"""Distributed training of one zoo model on Ray Train, and the driver around it.

Per worker: train() -> train_step() -> forward_backward(), with a small explicit state
(step, data position, RNG, best validation loss, the lr schedule, the worker count per step
range). The driver (fit) pins the warm-start parent, builds the TorchTrainer with a
deterministic run name under `storage`, so a rerun resumes.

Elastic: with a worker range (workers..max_workers) Ray Train starts with what is available,
shrinks when a node is lost and grows when capacity returns, each time restarting every
worker from the last checkpoint. The run is the same whatever the count: the global batches
come from data/order.py (a function of manifest, seed and step), each rank trains on its
slots, the entropy models' training noise is keyed by (seed, step, global slot) (SlotNoise),
and each rank's loss is weighted by its share of the batch, so the averaged gradient is the
global batch's up to float summation order.
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
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import TrainConfig
from .data.order import mix, rank_slots
from .models.entropy import EntropyBottleneck, EntropyModel
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
    data_positions: list = field(default_factory=list)  # [GlobalBatchStream.position()]
    workers: list = field(default_factory=list)  # [[first step, worker count], ...] per step range
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


class SlotNoise:
    """The entropy models' training noise, keyed by (seed, global step, global slot, call).

    Uniform(-0.5, 0.5) as before, but each sample's noise comes from its own generator seeded
    by its slot of the global batch, so a sample gets the same noise on any worker count and
    after any resume (the noise of a batch-wide draw would depend on the rank's slice).
    """

    def __init__(self, model: torch.nn.Module, seed: int):
        self.seed, self.step, self.slots, self.calls = seed, 0, range(0), 0
        for module in model.modules():
            if isinstance(module, EntropyModel):
                module.quantize = self._keyed(module, module.quantize)  # this instance only

    def begin(self, step: int, slots: range) -> None:
        self.step, self.slots, self.calls = step, slots, 0

    def _keyed(self, module, quantize):
        batch_inside = isinstance(module, EntropyBottleneck)  # its values are (C, 1, B * H * W)

        def keyed_quantize(inputs, mode, means=None):
            if mode != "noise":
                return quantize(inputs, mode, means)
            self.calls += 1
            n = len(self.slots)
            view = inputs.reshape(inputs.shape[0], n, -1) if batch_inside else inputs.reshape(n, -1)
            per_sample = []
            for slot in self.slots:
                g = torch.Generator(device=inputs.device)
                g.manual_seed(mix(self.seed, 3, self.step, slot, self.calls) >> 1)
                shape = (view.shape[0], view.shape[2]) if batch_inside else (view.shape[1],)
                per_sample.append(torch.rand(shape, generator=g, device=inputs.device, dtype=inputs.dtype) - 0.5)
            noise = torch.stack(per_sample, dim=1 if batch_inside else 0)
            return inputs + noise.reshape(inputs.shape)

        return keyed_quantize


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
        self.slots = rank_slots(cfg.batch_size, world, rank)
        self.noise = SlotNoise(self.model, cfg.seed)
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
        self.note_world()
        t_last, images_since = time.perf_counter(), 0
        if self.state.step >= cfg.max_steps:
            return
        batch_log = os.environ.get("COMPRESSZOO_BATCH_LOG")  # test hook: every batch's frames
        for batch in stream.batches(with_meta=bool(batch_log)):
            if batch_log:
                batch = _log_batch(batch_log, self.rank, self.world, *batch)
            if stream.step != self.state.step + 1:  # the stream was built at the checkpoint's step
                raise RuntimeError(f"data stream at step {stream.step - 1}, training at {self.state.step}")
            metrics = self.train_step(net, batch.to(self.device, non_blocking=True))
            self.state.step += 1
            images_since += self.cfg.batch_size
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
        self.logger.log_metrics({f"data_{k}": v for k, v in stream.stats().items()
                                 if isinstance(v, (int, float))}, self.state.step)

    def note_world(self) -> None:
        """Record the worker count from this step on (checkpoint and MLflow): a resized run is one run."""
        history = self.state.workers
        if not history or history[-1][1] != self.world:
            history.append([self.state.step, self.world])
            self.logger.log_metrics({"workers": self.world}, self.state.step)
            self.logger.set_tags({"compresszoo.workers": ",".join(f"{s}:{w}" for s, w in history)})

    def train_step(self, net, x: torch.Tensor) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        self.aux_optimizer.zero_grad(set_to_none=True)
        # A batch of another size than this rank's slots (a direct call, not the training
        # stream) is keyed as slots 0..n-1.
        self.noise.begin(self.state.step, self.slots if x.shape[0] == len(self.slots) else range(x.shape[0]))
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
        # DDP averages the ranks' gradients: weighting each rank's mean loss by its share of the
        # global batch (1 when the slices are equal) makes that the mean over the global batch.
        share = x.shape[0] * self.world / self.cfg.batch_size
        (losses["loss"] * share if share != 1 else losses["loss"]).backward()
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
        self.state.data_positions = [stream.position()]  # the same on every rank
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

    from .data.reader import GlobalBatchStream

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
    stream = GlobalBatchStream(cfg.data, rank=rank, world_size=world, batch_size=cfg.batch_size,
                               crop=cfg.crop, seed=cfg.seed, window=cfg.shuffle_buffer,
                               step=trainer.state.step, stop=max(cfg.max_steps, trainer.state.step),
                               task_cpus=cfg.data_cpus)
    saved = trainer.state.data_positions
    if saved and isinstance(saved[0], dict) and saved[0].get("version") == 1:  # the earlier reader's
        warnings.warn(f"{cfg.run_name()}: checkpoint of the earlier per-rank reader; training goes on from "
                      f"step {trainer.state.step} in the global order (the batches before it were "
                      "drawn in another order)", stacklevel=1)
    elif saved:
        stream.check_position(saved[0])
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
        scaling_config=ScalingConfig(num_workers=cfg.worker_range(), use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker},
                                     elastic_resize_monitor_interval_s=cfg.resize_check_s),
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
            "COMPRESSZOO_PID_DIR", "COMPRESSZOO_FAULT_AT_STEP", "COMPRESSZOO_FAULT_MARKER",
            "COMPRESSZOO_BATCH_LOG", "COMPRESSZOO_STEP_HOLD")
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
        # Ray Train's controller learns of a reported checkpoint when it polls the workers
        # (every 2 s): die after that, as a node lost mid-run would, not before it.
        time.sleep(5)
        os.kill(os.getpid(), 9)


def _log_batch(folder: str, rank: int, world: int, images: torch.Tensor, meta: dict) -> torch.Tensor:
    """Test hook: append `step world time key:y:x ...` for this rank's slice to rank<r>.batches,
    then wait while the file named by COMPRESSZOO_STEP_HOLD holds a step <= this one (a resize
    test parks the run at a checkpoint while it changes the cluster)."""
    crops = " ".join(f"{k}:{y}:{x}" for k, (y, x) in zip(meta["keys"], meta["offsets"]))
    with open(Path(folder, f"rank{rank}.batches"), "a") as f:
        f.write(f"{meta['step']} {world} {time.time():.3f} {crops}\n")
    hold = Path(os.environ.get("COMPRESSZOO_STEP_HOLD", "/nonexistent"))
    while True:
        try:
            if meta["step"] < int(hold.read_text()):
                break
        except FileNotFoundError:
            break
        except ValueError:  # being rewritten
            pass
        time.sleep(0.05)
    return images


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

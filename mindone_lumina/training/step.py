"""The compiled training step: the flow-matching loss, and the ``Trainer`` that owns optimizer, EMA, gradient
buffers, mixed precision, data-parallel reduction and ZeRO stage 1 for any loss Cell.

Loss (time convention in ``sampling.py``): with data x1, noise x0 and t, ``x_t = t x1 + (1 - t) x0`` and the model is
regressed onto the velocity ``x1 - x0`` (mean squared error), as Lumina-T2X ``lumina_next_t2i_mini/train.py``.
"""

import math
import os

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from .. import backend
from ..dtypes import ms_dtype
from .recipe import Recipe


class FlowMatchingLoss(nn.Cell):
    """Velocity MSE on ``x_t = t x1 + (1 - t) x0`` (per-sample mean, then batch mean). ``clock``: a Parameter the
    model's random masks follow (``models.lora.dropout_clock``), assigned from the batch's ``clock`` input."""

    def __init__(self, model, clock=None):
        super().__init__()
        self.model = model
        self.clock = clock

    def construct(self, x1, x0, t, cap_feats, cap_mask, cos, sin, gain, clock=None):
        if clock is not None:
            ops.assign(self.clock, clock)
        tt = t.reshape(-1, 1, 1, 1)
        xt = tt * x1 + (1.0 - tt) * x0
        v = self.model(xt, t, cap_feats, cap_mask, cos, sin, gain)
        diff = v.astype(ms.float32) - (x1 - x0)  # the loss in fp32 whatever the compute dtype
        return (diff * diff).mean()


_ema_update = ops.MultitypeFuncGraph("ema_update")


@_ema_update.register("Tensor", "Tensor", "Tensor")
def _ema_one(decay, ema, param):
    return ops.assign(ema, ema * decay + param * (1.0 - decay))


_accumulate = ops.MultitypeFuncGraph("accumulate")


@_accumulate.register("Tensor", "Tensor")
def _accumulate_one(acc, grad):
    return ops.assign_add(acc, grad)


_zero = ops.MultitypeFuncGraph("zero")


@_zero.register("Tensor")
def _zero_one(acc):
    return ops.assign(acc, ops.zeros_like(acc))


_add = ops.MultitypeFuncGraph("add")


@_add.register("Tensor", "Tensor")
def _add_one(acc, grad):
    return acc + grad


_shard = ops.MultitypeFuncGraph("shard")


@_shard.register("Function", "Int", "Tensor", "Bool")
def _shard_one(split, rank, grad, sharded):
    return split(grad)[rank] if sharded else grad


_scale = ops.MultitypeFuncGraph("scale")


@_scale.register("Number", "Tensor")
def _scale_one(factor, grad):
    return grad * factor


@_scale.register("Tensor", "Tensor")
def _scale_by_tensor(factor, grad):
    return grad * factor.astype(grad.dtype)


def norm_buckets(shapes, limit: int = 1 << 24) -> tuple:
    """Indices of consecutive tensors grouped so that each group holds at most ``limit`` elements (a tensor larger
    than that is a group of its own): the global gradient norm is one dot product per group of flattened gradients.
    MindSpore's CPU ReduceSum costs about 1 ms per call almost whatever its size (1.2 ms for 393K floats, where a
    matmul with a vector of ones takes 0.05 ms), so a square-and-sum per parameter, 153 of them, was 6% of the bench
    model's step; the bound keeps the flattened copy at 64 MB on a 2B model."""
    groups, current, size = [], [], 0
    for i, shape in enumerate(shapes):
        n = math.prod(shape)
        if current and size + n > limit:
            groups.append(tuple(current))
            current, size = [], 0
        current.append(i)
        size += n
    return tuple(groups + [tuple(current)] if current else groups)


ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults


class AdamWBiasCorrection(nn.learning_rate_schedule.LearningRateSchedule):
    """``value * sqrt(1 - beta2^t) / (1 - beta1^t)`` at optimizer step ``t = global_step + 1`` (``inverse``: divided).

    ``nn.AdamWeightDecay`` updates ``p -= lr * (wd * p + m / (sqrt(v) + eps))`` with no bias correction, so its early
    steps are up to 6.5x larger than ``torch.optim.AdamW``'s (3.2x at step 1; still 1.26x at step 1000). Given the
    learning rate times this factor and the weight decay divided by it, the update is AdamW's
    ``p -= lr * wd * p + lr * m_hat / (sqrt(v_hat) + eps')`` with ``eps' = eps / sqrt(1 - beta2^t)`` (eps is 1e-8).
    """

    def __init__(self, value, betas: tuple, inverse: bool = False):
        super().__init__()
        self.value = value
        self.beta1, self.beta2 = Tensor(betas[0], ms.float32), Tensor(betas[1], ms.float32)
        self.inverse = inverse

    def construct(self, global_step):
        t = global_step.astype(ms.float32) + 1.0
        factor = ops.sqrt(1.0 - ops.pow(self.beta2, t)) / (1.0 - ops.pow(self.beta1, t))
        return (self.value / factor if self.inverse else self.value * factor).reshape(())


class Trainer(nn.Cell):
    """Owns a loss Cell (its ``model`` is what is trained), optimizer, EMA and gradient buffers. ``step(*batch)`` is
    one compiled graph per optimizer step: loss and gradients of the (last) micro-batch, cross-rank mean, accumulated
    sum, clipping, AdamW, EMA. With gradient accumulation the earlier micro-batches go through ``accumulate``. The
    batch is whatever the loss Cell's ``construct`` takes (``FlowMatchingLoss``, ``vae_training.VAELoss``).

    Mixed precision: the model computes in ``cfg.precision`` (``Cell.to_float``: inputs and parameters cast inside
    the graph) while parameters, gradients, optimizer state, EMA and the loss stay fp32. fp16 scales the loss
    dynamically and skips the update of a step whose gradients overflow; bf16 has fp32's range and needs no scaling.

    ZeRO stage 1 (``zero_stage: 1`` under msrun) goes through mindone's ``ZeroHelper``: each rank keeps the AdamW
    moments (and a working copy of the weights) of 1/world of every parameter whose first dimension divides by the
    world size, updates that slice and all-gathers the weights. Gradients are still mean-reduced whole, so clipping
    sees the global norm; checkpoints hold the gathered, whole optimizer state.
    """

    def __init__(self, loss: nn.Cell, cfg: Recipe, world: int = 1):
        super().__init__()
        model = loss.model
        # Parameter.name carries the path of the Cells holding the model ("loss.model."); checkpoints keep the model's
        # own names, which parameters_and_names gives relative to it
        named = [(n, p) for n, p in model.parameters_and_names() if p.requires_grad]
        self.param_names = tuple(n for n, _ in named)
        backend.check_dtype_supported(ms_dtype(cfg.precision))
        if cfg.precision != "fp32":
            model.to_float(ms_dtype(cfg.precision))
        self.loss = loss
        loss.set_train(True)  # training-mode layers (a LoRA adapter's dropout)
        params = [p for _, p in named]
        self.params = ParameterTuple(params)
        # the learning rate of the current step (``step`` assigns it); the optimizer reads it through a schedule Cell,
        # as a Parameter passed as learning_rate would be copied at construction
        self.lr = Parameter(Tensor(cfg.lr, ms.float32), name="lr", requires_grad=False)
        # nn.AdamWeightDecay (mint's AdamW has no CPU kernel), made torch.optim.AdamW by the bias correction
        self.optimizer = nn.AdamWeightDecay(
            params,
            learning_rate=AdamWBiasCorrection(self.lr, ADAM_BETAS),
            weight_decay=AdamWBiasCorrection(Tensor(cfg.weight_decay, ms.float32), ADAM_BETAS, inverse=True),
            beta1=ADAM_BETAS[0],
            beta2=ADAM_BETAS[1],
            eps=ADAM_EPS,
        )
        self.ema = self.params.clone("ema", "same")
        self.grads = self.params.clone("grad_acc", "zeros")
        self.ema_decay = Tensor(cfg.ema_decay, ms.float32)
        self.clip = cfg.grad_clip
        self.accum = cfg.grad_accum
        self.hyper_map = ops.HyperMap()
        self.norm_buckets = norm_buckets([p.shape for p in params])
        self.scaled = cfg.precision == "fp16"
        self.scaler = ms.amp.DynamicLossScaler(cfg.loss_scale, 2, 1000) if self.scaled else None
        self.skipped = Parameter(Tensor(0, ms.int32), name="skipped_steps", requires_grad=False)
        self.grad_fn = ms.value_and_grad(self._scaled_loss, None, self.params)
        # data parallel (msrun): gradients are mean-reduced across ranks before they are accumulated
        self.grad_reducer = nn.DistributedGradReducer(params, mean=True, degree=world) if world > 1 else None
        self.zero = (
            _zero_helper(self.optimizer, os.path.join(cfg.output, "zero")) if cfg.zero_stage and world > 1 else None
        )
        self.world = world

    def _optimizer_entries(self) -> list:
        """AdamW's own state (moments, step, learning rate): not the weights, nor ZeRO's working copy of them."""
        skip = {id(p) for p in self.params}
        if self.zero is not None:
            skip |= {id(p) for p in self.zero.optimizer._parameters}
        return [p for p in self.optimizer.get_parameters() if id(p) not in skip]

    def _sharded_names(self) -> set:
        if self.zero is None:
            return set()
        opt, split = self.optimizer, self.zero.need_parameter_split
        return {m[i].name for m in (opt.moments1, opt.moments2) for i in range(len(split)) if split[i]}

    def _slice(self, value, rows: int):
        """This rank's ``rows`` rows of a whole array, as ZeroHelper splits along dim 0."""
        return value[self.zero.op_rank_id * rows : (self.zero.op_rank_id + 1) * rows]

    def optimizer_state(self) -> dict:
        """Name -> whole array of AdamW's state on every rank. Under ZeRO the slices are all-gathered (along dim 0,
        as ZeroHelper split them), so every rank must call this."""
        sharded = self._sharded_names()
        gather = self.zero.op_allgather if self.zero is not None else None
        return {p.name: (gather(p.value()) if p.name in sharded else p).asnumpy() for p in self._optimizer_entries()}

    def optimizer_shapes(self) -> dict:
        """Name -> whole shape of each entry of ``optimizer_state``."""
        sharded = self._sharded_names()
        return {
            p.name: (p.shape[0] * self.world, *p.shape[1:]) if p.name in sharded else tuple(p.shape)
            for p in self._optimizer_entries()
        }

    def load_optimizer_state(self, state: dict) -> None:
        """Inverse of ``optimizer_state`` (shapes checked by the caller): each rank takes its slice."""
        sharded = self._sharded_names()
        for p in self._optimizer_entries():
            value = self._slice(state[p.name], p.shape[0]) if p.name in sharded else state[p.name]
            p.set_data(Tensor(value, p.dtype))
        if self.zero is not None:  # ZeRO's working copy of the weights must follow the loaded weights
            for copy, weight, split in zip(
                self.zero.optimizer._parameters, self.params, self.zero.need_parameter_split
            ):
                value = self._slice(weight.asnumpy(), copy.shape[0]) if split else weight.asnumpy()
                copy.set_data(Tensor(value, copy.dtype))

    def _scaled_loss(self, *batch):
        loss = self.loss(*batch)
        return self.scaler.scale(loss) if self.scaled else loss

    def _grads(self, batch):
        loss, grads = self.grad_fn(*batch)
        if self.scaled:
            loss, grads = self.scaler.unscale(loss), self.scaler.unscale(grads)
        if self.grad_reducer is not None:
            grads = self.grad_reducer(grads)
        return loss, grads

    @ms.jit
    def accumulate(self, *batch):
        """A micro-batch before the last: its gradients are added to the buffers."""
        loss, grads = self._grads(batch)
        self.hyper_map(_accumulate, self.grads, grads)
        return loss

    @ms.jit
    def step(self, lr, *batch):
        """The last micro-batch and the update at learning rate ``lr`` (a scalar Tensor): returns (loss, gradient norm
        before clipping). The rate is an input, assigned inside the graph: ``set_data`` on a Parameter handed to
        ``nn.AdamWeightDecay`` as its learning rate never reached the update (measured: every step ran at the rate the
        Parameter held at construction), so no schedule applied."""
        ops.assign(self.lr, lr)
        loss, grads = self._grads(batch)
        if self.accum > 1:
            grads = self.hyper_map(_add, self.grads, grads)
            grads = self.hyper_map(ops.partial(_scale, 1.0 / self.accum), grads)
        # one global norm for the log and for clipping (clip_by_global_norm would compute it again per tensor)
        grad_norm = ops.sqrt(ops.addn([_sum_of_squares([grads[i] for i in bucket]) for bucket in self.norm_buckets]))
        if self.scaled:
            finite = ms.amp.all_finite(grads)
            self.scaler.adjust(finite)
            if finite:
                self._update(grads, grad_norm)
            else:
                ops.assign_add(self.skipped, ops.ones((), ms.int32))
        else:
            self._update(grads, grad_norm)
        if self.accum > 1:
            self.hyper_map(_zero, self.grads)
        return loss, grad_norm

    def _update(self, grads, grad_norm):
        # clip_by_global_norm's rule: g * clip / max(norm, clip)
        factor = self.clip / ops.maximum(grad_norm, self.clip)
        grads = self.hyper_map(ops.partial(_scale, factor), grads)
        if self.zero is None:
            self.optimizer(grads)
        else:  # this rank's slice of each sharded gradient; the helper all-gathers the updated weights
            rank, split = self.zero.op_rank_id, self.zero.need_parameter_split
            grads = self.hyper_map(ops.partial(_shard, self.zero.split_op, rank), grads, split)
            self.zero.run_optimizer(grads)
        self.hyper_map(ops.partial(_ema_update, self.ema_decay), self.ema, self.params)


def _sum_of_squares(tensors):
    flat = ops.concat([t.reshape(-1) for t in tensors])  # (P,)
    return ops.tensor_dot(flat, flat, 1)


def _zero_helper(optimizer, info_dir: str):
    """mindone's ZeRO stage 1 over the whole data-parallel world (needs msrun and ParallelMode.DATA_PARALLEL)."""
    from mindone.trainers.zero import ZeroHelper
    from mindspore.communication import GlobalComm

    helper = ZeroHelper(optimizer, 1, GlobalComm.WORLD_COMM_GROUP, params_split_info=info_dir)
    if helper.zero_stage != 1:
        raise ValueError("zero_stage 1 needs data-parallel mode: launch with msrun (tools/train.py sets it)")
    helper.split_params()
    return helper


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints: a folder per save, the "latest" pointer replaced last
# ------------------------------------------------------------------------------------------------------------------

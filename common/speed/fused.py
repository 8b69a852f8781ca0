"""Several independent runs trained as one: `Fused`, a `Method` over member methods.

The members share each batch (the same examples in the same order, e.g. the
cells of a T x alpha grid over one teacher's cached logits) but nothing else:
each has its own model, loss and variables. The fused loss is the sum of the
members' losses. Their variables are disjoint, so the gradient of that sum with
respect to a member's variables is exactly the member's own gradient, and an
optimizer that updates every variable on its own (Adam, SGD; no global-norm
clipping, no shared loss scale) gives each member the update it would get
alone. The members train in one compiled step per batch: one input pipeline,
one dispatch, one evaluation pass for all. Members whose method is the same but
for its runtime settings (KD cells: T and alpha) compute their loss in one call
on their stacked logits (`loss_groups`), so the step's loss graph is one
member's, not one per member; its gradients are the separate losses' (up to float rounding).

`Stacked`, the other form, is for members that are models of one Dense-only
architecture (Task 1's MLP student) whose losses read only their logits: it keeps
their weights stacked along a leading axis, so a step runs each layer once for all
members (one batched matmul) instead of once per member: the same arithmetic in
another summation order (updates equal within float tolerance, not bit for bit),
with a model graph the size of one member's. On a CPU each layer stays one
product per member (`batched_products`).
"""

import copy
import math

import keras
import tensorflow as tf

from kdtoolkit.speed import step_sharing
from kdtoolkit.methods.base import Distiller, Method
from kdtoolkit.speed.workspaces import structure


class Members(keras.layers.Layer):
    """Holds the members' models, so a resume state (`kdtoolkit.checkpoint`) names each
    variable by its member (`0.Sequential/...`, `1.Sequential/...`)."""

    def __init__(self, models, **kwargs):
        super().__init__(**kwargs)
        self.models = list(models)


def reads_model_output(member):
    """Whether `member`'s class logits are its model's output (`Method.forward` and
    `Method.class_logits` not overridden)."""
    return type(member).forward is Method.forward and type(member).class_logits is Method.class_logits


def shares_loss(member):
    """Whether `member`'s loss can be computed with others' in one call: its method
    is `stackable` and shareable (`kdtoolkit.speed.step_sharing`) and `reads_model_output`."""
    return step_sharing.stackable(member) and step_sharing.signature(member) is not None \
        and reads_model_output(member)


def loss_groups(members):
    """Lists of member indices whose loss terms one call computes for all: members
    that `shares_loss` of one `kdtoolkit.speed.step_sharing.loss_key` (e.g. KD cells that
    differ in T and alpha), in member order; every other member alone."""
    groups = {}
    for index, member in enumerate(members):
        key = step_sharing.loss_key(member) if shares_loss(member) else index
        groups.setdefault(key, []).append(index)
    return list(groups.values())


class _Output:
    """Stands in for a model inside a method's loss: returns given outputs, whatever the input."""

    def __init__(self, output):
        self.output = output

    def __call__(self, x, training=False):
        return self.output


def _on_output(method, output):
    """A copy of `method` whose model returns `output`."""
    view = copy.copy(method)
    view.model = _Output(output)
    return view


class Fused(Method):
    """`members` (methods on distinct models) trained together.

    Loss terms and class logits are keyed by member: term `ce` of member 2 is
    `"2/ce"`, its logits `"2/"` (`prefixes`), so `kdtoolkit.training.fit` tracks each
    member's terms and training accuracy apart; `member_history` recovers a
    member's history as if it had trained alone.
    """

    form = "looped"  # recorded with each member: how the group trained

    def __init__(self, members):
        self.members = list(members)
        if len(self.members) < 2:
            raise ValueError(f"fusing needs at least 2 members, got {len(self.members)}")
        super().__init__(Members([m.model for m in self.members]))
        self.prefixes = tuple(f"{i}/" for i in range(len(self.members)))
        self.term_names = tuple(p + t for p, m in zip(self.prefixes, self.members) for t in m.term_names)
        self.extra_layers = tuple(layer for m in self.members for layer in m.extra_layers)
        self.groups = loss_groups(self.members)

    @property
    def trainable_variables(self):
        return [v for m in self.members for v in m.trainable_variables]

    def class_logits(self, x, training=False):
        return {p: m.class_logits(x, training=training) for p, m in zip(self.prefixes, self.members)}

    def begin_epoch(self, epoch, epochs):
        for member in self.members:
            member.begin_epoch(epoch, epochs)

    def loss_terms(self, batch, training=True):
        """Each member's loss terms and class logits, keyed by its prefix."""
        return self.grouped_terms(batch, training)

    def grouped_terms(self, batch, training, outputs=None):
        """`loss_terms` from each of `groups`: a group of members that share a loss
        computes it once, on their `(members, batch, classes)` outputs and `(members,)`
        runtime settings (`kdtoolkit.speed.step_sharing`), and splits the `(members,)` terms; any
        other member computes its own. `outputs`: every member's stacked outputs
        (`Stacked`); None: each member's model runs on `batch["x"]`."""
        by_member = {}
        for indices in self.groups:
            first = self.members[indices[0]]
            if not shares_loss(first):  # alone in its group
                method = first if outputs is None else _on_output(first, outputs[indices[0]])
                by_member[indices[0]] = method.loss_terms(batch, training=training)
                continue
            if outputs is None:
                group_outputs = tf.stack([self.members[i].model(batch["x"], training=training) for i in indices])
            elif indices == list(range(indices[0], indices[-1] + 1)):
                group_outputs = outputs[indices[0]:indices[-1] + 1]
            else:
                group_outputs = tf.gather(outputs, indices)
            group = _on_output(first, group_outputs)
            for name in step_sharing.runtime_settings(first):
                setattr(group, name, tf.stack([tf.cast(getattr(self.members[i], name), tf.float32) for i in indices]))
            group_terms, group_logits = group.loss_terms(batch, training=training)
            for position, index in enumerate(indices):
                by_member[index] = ({name: value[position] for name, value in group_terms.items()},
                                    group_logits[position])
        terms, logits = {}, {}
        for index, prefix in enumerate(self.prefixes):
            member_terms, logits[prefix] = by_member[index]
            terms.update({prefix + name: value for name, value in member_terms.items()})
        return terms, logits

    def sync_members(self):
        """Leaves each member's model with its trained weights (here they train in place)."""

    def member_history(self, history, index):
        """Member `index`'s per-epoch records from the fused ones: its terms, `loss`
        (their sum), `train_accuracy` and held-out metrics under their plain names;
        `seconds`, `cpu_seconds` and `eval_seconds` are its equal share of the fused epoch's."""
        prefix, member = self.prefixes[index], self.members[index]
        records = []
        for fused in history:
            record = {"epoch": fused["epoch"]}
            record.update({name: fused[prefix + name] for name in member.term_names})
            record["loss"] = float(sum(record[name] for name in member.term_names))
            record.update({k[len(prefix):]: v for k, v in fused.items()
                           if k.startswith(prefix) and k[len(prefix):] not in record})
            for key in ("seconds", "cpu_seconds", "eval_seconds"):
                if key in fused:
                    record[key] = fused[key] / len(self.members)
            if fused.get("resumed"):
                record["resumed"] = True
            records.append(record)
        return records

    def epoch_line(self, record, epochs):
        """`epoch 3/12 18 runs: loss 0.21-0.35 train_acc 0.97-0.99 val_acc 0.975-0.985 4.1s`:
        the range over members of each number."""
        parts = [f"epoch {record['epoch']}/{epochs} {len(self.members)} runs:"]
        losses = [sum(record[p + t] for t in m.term_names) for p, m in zip(self.prefixes, self.members)]
        parts.append(f"loss {min(losses):.4f}-{max(losses):.4f}")
        names = sorted({k.split("/", 1)[1] for k in record if "/" in k and k.split("/", 1)[1].endswith("accuracy")})
        for name in names:
            values = [record[p + name] for p in self.prefixes if p + name in record]
            parts.append(f"{name.replace('accuracy', 'acc')} {min(values):.4f}-{max(values):.4f}")
        parts.append(f"{record['seconds']:.1f}s")
        return " ".join(parts)


def fuse(members, stack=False):
    """`members` trained together: `Stacked` when `stack` and `can_stack(members)`, else `Fused`."""
    return Stacked(members) if stack and can_stack(members) else Fused(members)


STACKABLE_LAYERS = (keras.layers.InputLayer, keras.layers.Flatten, keras.layers.Dense, keras.layers.Activation)


def can_stack(members):
    """Whether `Stacked` can train `members`: Sequential models of one structure made
    of Flatten (first only; without it the input must be `(batch, features)`), Dense
    (plain: no LoRA, not quantized) and Activation layers, and methods whose loss
    reads only the model's logits (no overridden forward, features or extra layers)."""
    models = [m.model for m in members]
    if not all(isinstance(model, keras.Sequential) for model in models):
        return False
    layers = [layer for layer in models[0].layers if not isinstance(layer, keras.layers.InputLayer)]
    if (not layers or not all(isinstance(layer, STACKABLE_LAYERS) for layer in layers)
            or any(isinstance(layer, keras.layers.Flatten) for layer in layers[1:])
            or not any(isinstance(layer, keras.layers.Dense) for layer in layers)
            or any(getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None)
                   for layer in layers)):
        return False
    if not isinstance(layers[0], keras.layers.Flatten) and input_rank(models[0]) != 2:
        return False  # a Dense layer on (batch, ..., features) is not a plain matrix product
    structures = {structure(model) for model in models}
    if len(structures) != 1 or None in structures:
        return False
    for member in members:
        if not reads_model_output(member):
            return False
        if member.extra_layers or (isinstance(member, Distiller) and set(member.student_outputs) != {"logits"}):
            return False
    return True


def batched_products():
    """Whether `StackedDense` runs a layer as one batched matrix product for all members
    (one kernel: GPUs) rather than one product per member (CPUs, where TensorFlow's
    batched product is the slower: `bench/bench_fused_forms.py`)."""
    return bool(tf.config.list_physical_devices("GPU"))


def input_rank(model):
    """The rank of a built model's input, batch axis included; None when unknown."""
    try:
        return len(model.inputs[0].shape)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


class StackedDense(keras.layers.Layer):
    """The weights of several models of one Dense-only architecture (`can_stack`),
    stacked: Dense layer j's kernels as one `(members, in, out)` variable
    `dense<j>_kernel`, its biases as `(members, out)`. `call(x)` maps a `(batch, ...)`
    input to every member's output, `(members, batch, out)`.

    `batched`: each layer is one batched matrix product for all members; else one
    product per member, on its slice (`tf.unstack`), the same operations as the
    member's own model. Default: `batched_products()`."""

    def __init__(self, models, batched=None, **kwargs):
        template = [layer for layer in models[0].layers if not isinstance(layer, keras.layers.InputLayer)]
        dense = [layer for layer in template if isinstance(layer, keras.layers.Dense)]
        super().__init__(dtype=dense[0].dtype_policy, **kwargs)
        self.count = len(models)
        self.batched = batched_products() if batched is None else bool(batched)
        self.plan = []  # ("flatten",), ("activation", fn) or ("dense", kernel, bias or None, fn)
        for layer in template:
            if isinstance(layer, keras.layers.Flatten):
                self.plan.append(("flatten",))
            elif isinstance(layer, keras.layers.Activation):
                self.plan.append(("activation", layer.activation))
            else:
                j = sum(step[0] == "dense" for step in self.plan)
                kernel = self.add_weight(shape=(self.count, *layer.kernel.shape), name=f"dense{j}_kernel",
                                         trainable=layer.trainable)
                bias = self.add_weight(shape=(self.count, *layer.bias.shape), name=f"dense{j}_bias",
                                       trainable=layer.trainable) if layer.use_bias else None
                self.plan.append(("dense", kernel, bias, layer.activation))
        self.load(models)

    def _pairs(self, models):
        """`(stacked variable, [each member's variable])` for every stacked variable."""
        dense = [[layer for layer in model.layers if isinstance(layer, keras.layers.Dense)] for model in models]
        steps = [step for step in self.plan if step[0] == "dense"]
        for j, (_, kernel, bias, _) in enumerate(steps):
            yield kernel, [layers[j].kernel for layers in dense]
            if bias is not None:
                yield bias, [layers[j].bias for layers in dense]

    def load(self, models):
        """Copies each member model's weights into its slice."""
        for stacked, members in self._pairs(models):
            stacked.assign(tf.stack([tf.convert_to_tensor(v) for v in members]))

    def store(self, models):
        """Copies each slice back into its member model."""
        for stacked, members in self._pairs(models):
            for index, variable in enumerate(members):
                variable.assign(stacked[index])

    def call(self, x):
        h = x  # the members' common input until the first Dense layer, then theirs apart
        for step in self.plan:
            if step[0] == "flatten":
                h = tf.reshape(h, (-1, math.prod(h.shape[1:])))
            elif step[0] == "activation":
                h = _each(step[1], h)
            else:
                _, kernel, bias, activation = step
                h = self._dense(h, kernel, bias)
                if activation is not None:
                    h = _each(activation, h)
        return tf.stack(h) if isinstance(h, list) else h

    def _dense(self, h, kernel, bias):
        """One Dense layer for every member: `h` is the common `(batch, in)` input,
        then `(members, batch, in)` (batched) or a list of each member's `(batch, in)`."""
        kernel = tf.cast(kernel, self.compute_dtype)
        bias = None if bias is None else tf.cast(bias, self.compute_dtype)
        if self.batched:
            if h.shape.rank == 2:  # the common input: broadcast (faster than an einsum on CPUs)
                h = tf.broadcast_to(h[None], (self.count, tf.shape(h)[0], h.shape[-1]))
            h = tf.matmul(h, kernel)
            return h if bias is None else h + bias[:, None, :]
        inputs = h if isinstance(h, list) else [h] * self.count
        outputs = [tf.matmul(member, weights) for member, weights in zip(inputs, tf.unstack(kernel))]
        return outputs if bias is None else [tf.nn.bias_add(o, b) for o, b in zip(outputs, tf.unstack(bias))]


def _each(fn, h):
    """`fn` applied to each member's tensor of a list, or to a tensor."""
    return [fn(member) for member in h] if isinstance(h, list) else fn(h)


class Stacked(Fused):
    """`Fused` members (`can_stack`) whose weights live in one `StackedDense`: the
    method's `model`, what is trained and saved in epoch states. Each member's loss
    terms are its own method's, on its slice of the stacked logits (`grouped_terms`).
    `sync_members` copies the trained weights into the members' models."""

    form = "stacked"

    def __init__(self, members, batched=None):
        super().__init__(members)
        if not can_stack(self.members):
            raise ValueError("these members cannot be stacked (see kdtoolkit.speed.fused.can_stack); use Fused")
        self.model = StackedDense([m.model for m in self.members], batched=batched)

    @property
    def trainable_variables(self):
        return self.model.trainable_variables

    def class_logits(self, x, training=False):
        outputs = self.model(x, training=training)
        return {prefix: outputs[index] for index, prefix in enumerate(self.prefixes)}

    def loss_terms(self, batch, training=True):
        return self.grouped_terms(batch, training, self.model(batch["x"], training=training))

    def sync_members(self):
        self.model.store([m.model for m in self.members])

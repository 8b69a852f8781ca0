"""Several independent runs trained as one: `Fused`, a `Method` over member methods.

The members share each batch (the same examples in the same order, e.g. the
cells of a T x alpha grid over one teacher's cached logits) but nothing else:
each has its own model, loss and variables. The fused loss is the sum of the
members' losses. Their variables are disjoint, so the gradient of that sum with
respect to a member's variables is exactly the member's own gradient, and an
optimizer that updates every variable on its own (Adam, SGD; no global-norm
clipping, no shared loss scale) gives each member the update it would get
alone. The members train in one compiled step per batch: one input pipeline,
one dispatch, one evaluation pass for all.
"""

import keras

from common.methods.base import Method


class Members(keras.layers.Layer):
    """Holds the members' models, so a resume state (`common.checkpoint`) names each
    variable by its member (`0.Sequential/...`, `1.Sequential/...`)."""

    def __init__(self, models, **kwargs):
        super().__init__(**kwargs)
        self.models = list(models)


class Fused(Method):
    """`members` (methods on distinct models) trained together.

    Loss terms and class logits are keyed by member: term `ce` of member 2 is
    `"2/ce"`, its logits `"2/"` (`prefixes`), so `common.training.fit` tracks each
    member's terms and training accuracy apart; `member_history` recovers a
    member's history as if it had trained alone.
    """

    def __init__(self, members):
        self.members = list(members)
        if len(self.members) < 2:
            raise ValueError(f"fusing needs at least 2 members, got {len(self.members)}")
        super().__init__(Members([m.model for m in self.members]))
        self.prefixes = tuple(f"{i}/" for i in range(len(self.members)))
        self.term_names = tuple(p + t for p, m in zip(self.prefixes, self.members) for t in m.term_names)
        self.extra_layers = tuple(layer for m in self.members for layer in m.extra_layers)

    @property
    def trainable_variables(self):
        return [v for m in self.members for v in m.trainable_variables]

    def class_logits(self, x, training=False):
        return {p: m.class_logits(x, training=training) for p, m in zip(self.prefixes, self.members)}

    def loss_terms(self, batch, training=True):
        terms, logits = {}, {}
        for prefix, member in zip(self.prefixes, self.members):
            member_terms, logits[prefix] = member.loss_terms(batch, training=training)
            terms.update({prefix + name: value for name, value in member_terms.items()})
        return terms, logits

    def member_history(self, history, index):
        """Member `index`'s per-epoch records from the fused ones: its terms, `loss`
        (their sum), `train_accuracy` and held-out metrics under their plain names;
        `seconds` and `eval_seconds` are its equal share of the fused epoch's."""
        prefix, member = self.prefixes[index], self.members[index]
        records = []
        for fused in history:
            record = {"epoch": fused["epoch"]}
            record.update({name: fused[prefix + name] for name in member.term_names})
            record["loss"] = float(sum(record[name] for name in member.term_names))
            record.update({k[len(prefix):]: v for k, v in fused.items()
                           if k.startswith(prefix) and k[len(prefix):] not in record})
            for key in ("seconds", "eval_seconds"):
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

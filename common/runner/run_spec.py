"""What one run is: its readable name and its identity, both derived here.

A run folder's name (`kd-T4-a0.5-s0`) is for people; its identity (the settings
that define it, hashed into `identity_hash`) is what `kdtoolkit.runner.results` checks, so
a finished run with other settings is never mistaken for this one. Both come
from one frozen `RunSpec`, so they cannot drift apart.
"""

import dataclasses

from kdtoolkit.files import identity_hash


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of an experiment.

    `stem`: the name without the seed (`kd-T4-a0.5`, `teacher-fe`);
    `experiment`: the experiment it belongs to (`teacher`, `kd`, `ta`, ...);
    `seed`: its random seed; `settings`: everything else that defines it (the
    task's shared settings, then the run's own: T, alpha, method options, phase),
    later keys overriding earlier ones.
    """

    stem: str
    experiment: str
    seed: int
    settings: dict = dataclasses.field(default_factory=dict, hash=False)

    @property
    def name(self):
        """The run folder's name: the stem and the seed (`kd-T4-a0.5-s0`); seeds of one
        stem group by stripping `-s<seed>`."""
        return run_name(self.stem, self.seed)

    @property
    def identity(self):
        """`{"experiment", "seed", **settings}`: what `kdtoolkit.runner.results` records and checks."""
        return {"experiment": self.experiment, "seed": self.seed, **self.settings}

    @property
    def identity_hash(self):
        return identity_hash(self.identity)

    def phase(self, suffix, **settings):
        """The run of one phase of this one (Task 2's `-fe`, `-ft`): `suffix` joined to the
        stem, `settings` over this run's."""
        return dataclasses.replace(self, stem=f"{self.stem}-{suffix}", settings={**self.settings, **settings})


def run_name(stem, seed):
    """`kd-T4-a0.5`, 0 -> `kd-T4-a0.5-s0`: a run folder's name."""
    return f"{stem}-s{seed}"


def run_tag(settings):
    """`{"temperature": 4.0, "alpha": 0.5, "nckd_weight": 8.0}` -> `"T4-a0.5-nw8"`: a
    readable run-name part (T, alpha, then each option by its words' initials; a
    switch by its label when on, `no<label>` when off: `standardize` is `std`)."""
    short = {"temperature": "T", "alpha": "a", "standardize": "std"}
    parts = []
    for key, value in settings.items():
        label = short.get(key) or "".join(word[0] for word in key.split("_"))
        if isinstance(value, bool):
            parts.append(label if value else f"no{label}")
        else:
            parts.append(f"{label}{value:g}" if isinstance(value, (int, float)) else f"{label}{value}")
    return "-".join(parts)


def method_stem(method, roles, settings):
    """The stem of a student distilled by registered `method` along a chain of `roles`
    (`["ta", "takd"]`): the roles, the method unless it is KD or the first role, and
    its settings (`run_tag`): `kd-T4-a0.5`, `dkd-T4-tw1-nw8-w0.0833`, `ta-takd-dkd-...`."""
    shown = [] if method in ("kd", roles[0]) else [method]
    return "-".join([*roles, *shown, run_tag(settings)])

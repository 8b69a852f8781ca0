"""Run records as the report groups them: by seed, by headline row (from each
run's recorded identity and config), and the settings line naming what produced
a table."""

from pathlib import Path

from kdtoolkit.metrics import top1_agreement
from kdtoolkit.runner.results import mean_std, seed_group
from reports import registry
from reports.read import outputs_of


def grouped(records, metric, key=None):
    """`{group: (mean, std, n, record)}` over seeds for records that have `metric`;
    `key(record)` names a record's group (default: its run name without the seed);
    records whose key is None are left out."""
    key = key or (lambda record: seed_group(record["run"]))
    groups = {}
    for record in records:
        group = key(record) if record.get(metric) is not None else None
        if group is not None:
            groups.setdefault(group, []).append(record)
    return {g: (*mean_std([r[metric] for r in rs]), len(rs), rs[0]) for g, rs in groups.items()}


def configured(record):
    """Whether a run was its invocation's configured run of its experiment, from its
    recorded identity and config: each KD setting (T, alpha), weights choice and
    registered method's option that its identity holds has the config's value (a
    grid cell or a T-curve point at other settings is not)."""
    ident, config = record.get("identity", {}), record.get("config", {})
    expected = {k: config.get(k) for k in ("temperature", "alpha")}
    method = ident.get("method", ident.get("experiment"))
    if method in registry.methods():
        given = (config.get("method_options") or {}).get(method, {})
        options = registry.methods()[method].options  # read from common/methods/ without importing it
        expected.update({name: given.get(name, default) for name, default in options.items()
                         if name not in registry.shared_options()})  # those are the config's --temperature, --alpha
    if ident.get("weights") is not None and ident.get("experiment") == "scratch":
        expected["weights"] = str(config.get("weights"))
    return all(ident[k] == v for k, v in expected.items() if k in ident and v is not None)


def headline_key(record):
    """The headline row of a run, from its identity: its experiment (`teacher`, `kd`,
    `scratch`, `skd-teacher`, `skd`, `ta`, `takd`), with `-init_none` for Task 2 runs
    from random weights; None for a run at other settings than its invocation's."""
    ident = record.get("identity", {})
    experiment = ident.get("experiment")
    if experiment is None or not configured(record):
        return None
    return f"{experiment}-init_none" if str(ident.get("weights")) == "none" and \
        str(record.get("config", {}).get("weights")) != "none" else experiment


def phase_key(phase):
    """`headline_key` of Task 2 runs of one phase (`"finetune"`): the other phases' runs get None."""
    return lambda record: headline_key(record) if record.get("identity", {}).get("phase") == phase else None


def headline_label(label, record):
    """`label` with the record's identity filled in (`"KD student (T={temperature:g})"`)."""
    return label.format(**{k: v for k, v in record.get("identity", {}).items() if isinstance(v, (int, float))})


SETTINGS = (  # identity key -> how a settings line names it
    ("epochs", "epochs"), ("batch_size", "batch"), ("learning_rate", "learning rate"), ("image_size", "image px"),
    ("weights", "weights"), ("augment", "augmentation"),
)


def _values(values):
    values = sorted({str(v) for v in values if v is not None})
    return values[0] if len(values) == 1 else " / ".join(values)


def settings_line(records):
    """One italic line naming what produced a table: training settings (per phase
    for Task 2), seeds and data (source, fingerprint, sizes; synthetic said first)."""
    if not records:
        return ""
    parts = []
    phases = sorted({r["identity"].get("phase") for r in records if r["identity"].get("phase")})
    for key, label in SETTINGS:
        if key == "epochs" and phases:
            parts.append("epochs " + ", ".join(
                f"{phase} {_values(r['identity'].get('epochs') for r in records if r['identity'].get('phase') == phase)}"
                for phase in phases))
        elif any(key in r["identity"] for r in records):
            parts.append(f"{label} {_values(r['identity'].get(key) for r in records)}")
    seeds = sorted({r.get("seed", 0) for r in records})
    parts.append(f"seeds {', '.join(map(str, seeds))} (n={len(seeds)})")
    data = [r.get("data") or {} for r in records]
    if not all(data):
        parts.append("data: not recorded (results from before data fingerprints)")
    else:
        first = data[0]
        synthetic = "SYNTHETIC images, " if any(d.get("synthetic") for d in data) else ""
        parts.append(f"data: {synthetic}{_values(source_name(d['source']) for d in data)} (fingerprint "
                     f"{_values(d['fingerprint'] for d in data)}), {first['train']:,} train / "
                     f"{first['validation']:,} validation / {first['test']:,} test")
    return "*Settings: " + "; ".join(parts) + ".*\n"


def source_name(source):
    """A recorded data source without the machine's folders: `"/x/y/mnist.npz (first 2000 ...)"`
    -> `"mnist.npz (first 2000 ...)"`."""
    path, _, rest = str(source).partition(" (")
    return Path(path).name + (f" ({rest}" if rest else "")


def test_count(records):
    """`"977 "` (the recorded test-set size and a space), or "" when not recorded."""
    sizes = {(r.get("data") or {}).get("test") for r in records} - {None}
    return f"{sizes.pop():,} " if len(sizes) == 1 else ""


def is_synthetic(records):
    return any((r.get("data") or {}).get("synthetic") for r in records)


def seed_teacher(records, key):
    """`{seed: run name}` of each seed's teacher (`key(record) == "teacher"`)."""
    return {r.get("seed", 0): r["run"] for r in records if key(r) == "teacher"}


def fidelity_to_teacher(root, record, teachers):
    """Top-1 agreement on the test set of a run with the model it was distilled from
    (`distilled_from`, recorded), else with its seed's teacher; None for a teacher or
    when either saved no test outputs."""
    source = record.get("distilled_from") or teachers.get(record.get("seed", 0))
    mine, theirs = outputs_of(root, record["run"]), outputs_of(root, source) if source else None
    if source == record["run"] or mine is None or theirs is None:
        return None
    return top1_agreement(mine[0], theirs[0])

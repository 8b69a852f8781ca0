"""Several runs of one seed trained together in one compiled step (`kdtoolkit.speed.fused`),
each recorded as the run it would be alone: Task 1's fused grid.
"""

import datetime
import shutil
import time

import keras

from kdtoolkit import device, training
from kdtoolkit.runner import locks, runs
from kdtoolkit.speed.fused import fuse
from kdtoolkit.files import identity_hash, read_json, write_json_atomic


def distil_fused(task, students, parent, stack=False, **fit_options):
    """Distils the unfinished of `students`, `[(spec, build, factory)]` as
    `Recipes.distil` takes them, all from `parent()`, together (`task`: the
    `kdtoolkit.runner.recipes.Recipes` of one seed): one compiled step per
    batch trains them all (`kdtoolkit.speed.fused.fuse`; with `stack`, their weights
    stacked when the architecture allows). Each starts from the weights
    and sees the batches it would alone (its seed is set before it is built, the
    shuffle is the seed's), so each is recorded as the run `distil` would
    record: same name, identity and weights (within float tolerance); its
    record says `"fused"` with whom, and its times are its equal share.

    Fewer than two unfinished: nothing is done (train them one by one). For a
    task whose `train_model` is one run (Task 1).

    Several processes: the group is named after ALL of `students`, finished or not
    (`group_name`), and everything happens under that one lock, so a second process
    reaching the group while the first trains or records it waits, then finds the
    cells recorded and trains nothing. The members a group started with are kept
    in `<out>/<group>/members.json` with its epoch state until every member is
    recorded: a group stopped while recording (some members recorded) is resumed
    as that same group and records only the rest, to the numbers the uninterrupted
    group would have recorded (a smaller group rounds differently). A member is
    recorded under its own run lock and only when still unfinished, so no record
    is written twice.
    """
    cells = [(spec.name, spec.identity, build, factory) for spec, build, factory in students]
    unfinished = [cell for cell in cells if task.store.finished(cell[0], cell[1]) is None]
    group = group_name(cells, task.seed)
    if len(unfinished) < 2 and not (task.store.run_dir(group) / MEMBERS).exists():
        return
    with locks.hold(task.store.root, group, task.log):  # another process may be training or recording this group
        unfinished = [cell for cell in cells if task.store.finished(cell[0], cell[1]) is None]
        members = _members_in_progress(task.store, group, cells)
        if members is not None and not {m[0] for m in members} & {cell[0] for cell in unfinished}:
            shutil.rmtree(task.store.run_dir(group), ignore_errors=True)  # all recorded: only its folder was left
            members = None
        if members is None and len(unfinished) >= 2:
            members = unfinished
        if members:
            _train_fused(task, members, group, {"fused": [identity for _, identity, _, _ in members]}, parent,
                         stack, fit_options)


MEMBERS = "members.json"  # in a group's folder: the runs it trains, while it is in progress


def group_name(cells, seed):
    """`fused-<hash>-s<seed>`: a group's folder and lock, from the identities of every
    one of `cells` (`(name, identity, ...)`), whichever are finished."""
    return f"fused-{identity_hash({'fused': [cell[1] for cell in cells]})[:8]}-s{seed}"


def _members_in_progress(store, group, cells):
    """The cells of the group `group` started earlier and not yet fully recorded
    (`members.json`), or None (none started, or a list that does not match `cells`)."""
    path = store.run_dir(group) / MEMBERS
    if not path.exists():
        return None
    names, problem = read_json(path)
    by_name = {cell[0]: cell for cell in cells}
    if problem or not isinstance(names, list) or not names or not all(n in by_name for n in names):
        return None
    return [by_name[n] for n in names]


def _train_fused(task, pending, group, group_identity, parent, stack, fit_options):
    """`distil_fused`'s training of the group `group` of runs `pending` (under its lock)."""
    names = [name for name, *_ in pending]
    resume_dir = task.store.resume_dir(group, group_identity)  # (sets a damaged group folder aside first)
    write_json_atomic(task.store.run_dir(group) / MEMBERS, names)
    arrays = task.distil_data(parent, [factory for *_, factory in pending])()
    models = []
    for index, (_, identity, build, _) in enumerate(pending):
        runs.set_seed(identity["seed"])  # as `runs.run` does before building a model
        with keras.name_scope(f"fused{index}"):  # distinct variable paths for the one optimizer
            models.append(task.build_in_scope(build))
    with task.strategy.scope():  # `fuse` may create variables (stacked weights)
        method = fuse([factory(model) for model, (*_, factory) in zip(models, pending)], stack)
    task.log(f"[{group}] training {len(pending)} runs in one {method.form} step: {', '.join(names)}")
    device.reset_peak_memory()
    started = datetime.datetime.now(datetime.timezone.utc)
    start = time.perf_counter()
    try:
        history = task.fit_model(group, method.model, lambda _: method, arrays,
                                 resume_dir=resume_dir, **fit_options)
    except training.TrainingDiverged:
        shutil.rmtree(task.store.run_dir(group), ignore_errors=True)
        raise
    method.sync_members()
    share = (time.perf_counter() - start) / len(pending)
    evaluation_start = time.perf_counter()
    outputs = task.held_out(training.compiled_predictor(method.class_logits))  # every member in one pass
    evaluation_share = (time.perf_counter() - evaluation_start) / len(pending)
    recorded = 0
    for index, (name, identity, build, factory) in enumerate(pending):
        recording_start = time.perf_counter()
        with locks.hold(task.store.root, name, task.log):  # a process training it alone (--fuse-grid off) may have
            if task.store.finished(name, identity) is not None:  # recorded it meanwhile, or a resumed group did
                continue
            prefix = method.prefixes[index]
            member_outputs = {split: (logits[prefix], labels) for split, (logits, labels) in outputs.items()}
            metrics = task.final_metrics(name, member_outputs, factory.parent_name)
            runs.finish(task.store, name, identity=identity, config=task.config.as_dict(), model=models[index],
                        history=method.member_history(history, index), metrics=metrics, started=started,
                        train_seconds=share,
                        wall_seconds=share + evaluation_share + time.perf_counter() - recording_start,
                        about={"data": task.data_info(),
                               "fused": {"runs": len(pending), "group": group, "form": method.form}})
        recorded += 1
        task.keep(name, models[index], build)
    shutil.rmtree(task.store.run_dir(group), ignore_errors=True)
    task.log(f"[{group}] recorded {recorded} of its {len(pending)} runs in {time.perf_counter() - start:.1f}s")

"""Several runs of one seed trained together in one compiled step (`common.fused`),
each recorded as the run it would be alone: Task 1's fused grid.
"""

import datetime
import shutil
import time

import keras

from common import device, locks, runs, training
from common.fused import fuse
from common.results import identity_hash


def distil_fused(task, students, parent, stack=False, **fit_options):
    """Distils the unfinished of `students`, `[(spec, build, factory)]` as
    `Recipes.distil` takes them, all from `parent()`, together (`task`: the
    `common.recipes.Recipes` of one seed): one compiled step per
    batch trains them all (`common.fused.fuse`; with `stack`, their weights
    stacked when the architecture allows). Each starts from the weights
    and sees the batches it would alone (its seed is set before it is built, the
    shuffle is the seed's), so each is recorded as the run `distil` would
    record: same name, identity and weights (within float tolerance); its
    record says `"fused"` with whom, and its times are its equal share.

    Fewer than two unfinished: nothing is done (train them one by one). For a
    task whose `train_model` is one run (Task 1). A resumable group: its epoch
    state lives in `<out>/fused-<hash>-s<seed>/` until every member is recorded.
    """
    pending = [(spec.name, spec.identity, build, factory) for spec, build, factory in students
               if task.store.finished(spec.name, spec.identity) is None]
    if len(pending) < 2:
        return
    group_identity = {"fused": [identity for _, identity, _, _ in pending]}
    group = f"fused-{identity_hash(group_identity)[:8]}-s{task.seed}"
    with locks.hold(task.store.root, group, task.log):  # another process may be training this group
        if all(task.store.finished(name, identity) is None for name, identity, *_ in pending):
            _train_fused(task, pending, group, group_identity, parent, stack, fit_options)


def _train_fused(task, pending, group, group_identity, parent, stack, fit_options):
    """`distil_fused`'s training of the group `group` of runs `pending` (under its lock)."""
    names = [name for name, *_ in pending]
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
                                 resume_dir=task.store.resume_dir(group, group_identity), **fit_options)
    except training.TrainingDiverged:
        shutil.rmtree(task.store.run_dir(group), ignore_errors=True)
        raise
    method.sync_members()
    share = (time.perf_counter() - start) / len(pending)
    evaluation_start = time.perf_counter()
    outputs = task.held_out(training.compiled_predictor(method.class_logits))  # every member in one pass
    evaluation_share = (time.perf_counter() - evaluation_start) / len(pending)
    for index, (name, identity, build, factory) in enumerate(pending):
        recording_start = time.perf_counter()
        prefix = method.prefixes[index]
        member_outputs = {split: (logits[prefix], labels) for split, (logits, labels) in outputs.items()}
        metrics = task.final_metrics(name, member_outputs, factory.parent_name)
        runs.finish(task.store, name, identity=identity, config=task.config.as_dict(), model=models[index],
                    history=method.member_history(history, index), metrics=metrics, started=started,
                    train_seconds=share,
                    wall_seconds=share + evaluation_share + time.perf_counter() - recording_start,
                    about={"data": task.data_info(),
                           "fused": {"runs": len(pending), "group": group, "form": method.form}})
        task.keep(name, models[index], build)
    shutil.rmtree(task.store.run_dir(group), ignore_errors=True)
    task.log(f"[{group}] recorded {len(pending)} runs in {time.perf_counter() - start:.1f}s")

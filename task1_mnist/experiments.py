"""Task 1 recipes: teacher, KD student, scratch student, T x alpha grid, FLOPs.

Every recipe trains through `common.training.fit` and records through
`common.runs.run`, so each run is resumable and carries its config, seed,
versions, history and timings. The frozen teacher's logits on the training set
are computed once and reused by every KD run (MNIST has no augmentation).
"""

import keras

from common import data as common_data
from common import methods, runs, training
from common.errors import DataError
from common.results import ResultsStore, write_csv_atomic, write_json_atomic
from task1_mnist import data as mnist
from task1_mnist.models import build_student, build_teacher

EVAL_BATCH = 1024


def kd_run_name(temperature, alpha, seed):
    return f"kd-T{temperature:g}-a{alpha:g}-s{seed}"


class Task1:
    """Runs Task 1 experiments for one config over one loaded dataset."""

    def __init__(self, config, arrays=None, log=None):
        self.config = config
        self.log = log or (lambda _msg: None)
        self.arrays = arrays if arrays is not None else mnist.load_mnist(config.data_dir, config.limit)
        self.store = ResultsStore(config.out)
        self.test_data = common_data.batched(
            {"x": self.arrays["x_test"], "y": self.arrays["y_test"]}, EVAL_BATCH, map_fn=mnist.scale
        )
        self._teacher = None
        self._teacher_logits = None

    # -- shared plumbing -------------------------------------------------------

    def identity(self, experiment, **settings):
        c = self.config
        return {
            "experiment": experiment,
            "seed": c.seed,
            "epochs": c.epochs,
            "batch_size": c.batch_size,
            "learning_rate": c.learning_rate,
            "train_examples": int(len(self.arrays["y_train"])),
            **settings,
        }

    def train_data(self, **extra_arrays):
        arrays = {"x": self.arrays["x_train"], "y": self.arrays["y_train"], **extra_arrays}
        return common_data.batched(
            arrays, self.config.batch_size, shuffle=True, seed=self.config.seed, map_fn=mnist.scale
        )

    def evaluate(self, model):
        logits, labels = training.predict(training.compiled_predictor(model), self.test_data)
        return {"test_accuracy": training.accuracy(logits, labels)}

    def train(self, name, identity, build, make_method, train_data, keep_checkpoints=False):
        """Trains `make_method(model)` on `train_data()`; returns `(record, model)`.

        With `keep_checkpoints`, the weights after every epoch are kept as
        `<run>/checkpoints/epoch-NN.weights.h5` (early-stopped teachers).
        """

        def train(model, data):
            def checkpoint(epoch, _record):
                model.save_weights(self.checkpoint_path(name, epoch))

            self.checkpoint_path(name, 1).parent.mkdir(parents=True, exist_ok=True)
            return training.fit(
                make_method(model),
                data,
                epochs=self.config.epochs,
                optimizer=keras.optimizers.Adam(self.config.learning_rate),
                eval_data=self.test_data,
                log=lambda line: self.log(f"[{name}] {line}"),
                on_epoch_end=checkpoint if keep_checkpoints else None,
            )

        return runs.run(
            self.store,
            name,
            identity=identity,
            config=self.config.as_dict(),
            build=build,
            data=train_data,
            train=train,
            evaluate=self.evaluate,
            log=self.log,
        )

    def checkpoint_path(self, name, epoch):
        return self.store.run_dir(name) / "checkpoints" / f"epoch-{epoch:02d}.weights.h5"

    # -- experiments -----------------------------------------------------------

    def teacher(self):
        """Trains (or loads) the teacher; returns its record."""
        name = f"teacher-s{self.config.seed}"
        record, model = self.train(
            name, self.identity("teacher"), build_teacher, methods.CrossEntropy, self.train_data,
            keep_checkpoints=True,
        )
        if model is None:
            raise DataError(
                f"{self.store.weights_path(name)} is missing; delete {self.store.run_dir(name)} "
                "to train the teacher again"
            )
        self._teacher = model
        return record

    def teacher_model(self):
        """The trained teacher, trained or loaded once per `Task1` object."""
        if self._teacher is None:
            self.teacher()
        return self._teacher

    def teacher_logits(self):
        """`(n_train, 10)` teacher logits on the training set, computed once."""
        if self._teacher_logits is None:
            self._teacher_logits = common_data.teacher_logits(
                self.teacher_model(),
                {"x": self.arrays["x_train"], "y": self.arrays["y_train"]},
                EVAL_BATCH,
                map_fn=mnist.scale,
            )
        return self._teacher_logits

    def kd(self, temperature=None, alpha=None):
        """A student distilled from the teacher at (T, alpha); returns its record."""
        temperature = self.config.temperature if temperature is None else temperature
        alpha = self.config.alpha if alpha is None else alpha
        name = kd_run_name(temperature, alpha, self.config.seed)
        record, _ = self.train(
            name,
            self.identity("kd", temperature=float(temperature), alpha=float(alpha)),
            build_student,
            lambda student: methods.Distillation(student, temperature, alpha),
            lambda: self.train_data(teacher_logits=self.teacher_logits()),
        )
        return record

    def scratch(self):
        """The student trained on hard labels only."""
        record, _ = self.train(
            f"scratch-s{self.config.seed}",
            self.identity("scratch"),
            build_student,
            methods.CrossEntropy,
            self.train_data,
        )
        return record

    def grid(self):
        """Every (T, alpha) cell; writes `grid.csv` and `grid.json` (best cell)."""
        cells = [(t, a) for t in self.config.temperatures for a in self.config.alphas]
        rows = []
        for index, (temperature, alpha) in enumerate(cells, 1):
            self.log(f"[grid {index}/{len(cells)}] T={temperature:g} alpha={alpha:g}")
            record = self.kd(temperature, alpha)
            rows.append(
                {
                    "temperature": float(temperature),
                    "alpha": float(alpha),
                    "test_accuracy": record["test_accuracy"],
                    "run": record["run"],
                }
            )
        best = max(rows, key=lambda row: row["test_accuracy"])
        write_csv_atomic(self.store.root / "grid.csv", rows, ("temperature", "alpha", "test_accuracy", "run"))
        write_json_atomic(self.store.root / "grid.json", {"cells": rows, "best": best})
        self.log(
            f"[grid] best: T={best['temperature']:g} alpha={best['alpha']:g} "
            f"test_accuracy {best['test_accuracy']:.4f}"
        )
        return {"cells": rows, "best": best}

    def flops(self):
        """Parameters and FLOPs (batch 1) of each model; writes `flops.csv`."""
        rows = []
        for label, build in (
            ("teacher", build_teacher),
            ("student (KD)", build_student),
            ("student (scratch)", build_student),
        ):
            rows.append({"model": label, **runs.model_size(build())})
        write_csv_atomic(self.store.root / "flops.csv", rows, ("model", "params", "flops"))
        for row in rows:
            self.log(f"[flops] {row['model']}: {row['params']:,} params, {row['flops']:,} FLOPs")
        return rows

    def run(self, only=None):
        """Runs the selected experiments in a dependency-friendly order."""
        only = tuple(only or self.config.only)
        results = {}
        for experiment in ("flops", "teacher", "kd", "scratch", "grid"):
            if experiment in only:
                results[experiment] = getattr(self, experiment)()
        self.store.write_summary()
        return results

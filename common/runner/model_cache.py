"""The trained models of one seed's runs, held for the next links of a chain."""

import collections


class ModelCache:
    """The last `size` trained models in memory (Task 2's take hundreds of MB each);
    an older one is rebuilt with `build_in_scope(its builder)` and loaded from
    `weights_path(name)` when asked for again."""

    def __init__(self, size, build_in_scope, weights_path):
        self.size, self.build_in_scope, self.weights_path = size, build_in_scope, weights_path
        self._models = collections.OrderedDict()  # most recent last
        self._builders = {}  # run name -> how to build its model again

    def knows(self, name):
        """Whether run `name` was trained or loaded here (so `get` can give its model)."""
        return name in self._builders

    def in_memory(self):
        """Names of the runs whose models are held now, oldest first."""
        return list(self._models)

    def keep(self, name, model, build=None):
        """Holds `model` as the most recent, dropping the oldest beyond `size`; `build`:
        how to build it again (a run trained or loaded here)."""
        if build is not None:
            self._builders[name] = build
        self._models[name] = model
        self._models.move_to_end(name)
        while len(self._models) > self.size:
            self._models.popitem(last=False)

    def get(self, name):
        """The model of run `name`: from memory, or rebuilt from its saved weights."""
        if name not in self._models:
            model = self.build_in_scope(self._builders[name])
            model.load_weights(self.weights_path(name))
            self.keep(name, model)
        self._models.move_to_end(name)
        return self._models[name]

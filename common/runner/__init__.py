"""The course runner: tasks' interface, run specification, results store, locks, sessions,
CLI, configuration, the experiments (recipes) and the research studies. A client of the library."""

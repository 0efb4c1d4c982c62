"""Ability tasks: importing this package registers them (nothing is read until a task loads).

`make_task(name, shots=..., seed=..., path=..., **settings)` builds one; `list_tasks()` describes
them all (ability, shots, metric, output, offline source) for `kvbench tasks`.
"""

# Importing a task's module registers it; ruler and longbench register the two sources of longctx.
from kvbench.tasks import csqa, gsm8k, humaneval, longbench, longctx, longgen, mmlu, ruler, safety  # noqa: F401
from kvbench.tasks.base import ABILITIES, TASKS, Sample, Task, TaskConfig, list_tasks, make_task, register_task

__all__ = ["ABILITIES", "TASKS", "Sample", "Task", "TaskConfig", "list_tasks", "make_task", "register_task"]

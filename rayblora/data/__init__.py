"""Data: task formats (classification, multiple choice -> answer tokens), built-in and user sources, batches."""

from rayblora.data.batches import encode, eval_batches, make_batch, train_batch, train_batch_indices
from rayblora.data.formats import DataError, TaskSpec, classification_spec, multiple_choice_spec
from rayblora.data.sources import BUILTIN_TASKS, TaskData, load_task_data, read_rows, split_name

__all__ = ["BUILTIN_TASKS", "DataError", "TaskData", "TaskSpec", "classification_spec", "encode",
           "eval_batches", "load_task_data", "make_batch", "multiple_choice_spec", "read_rows", "split_name",
           "train_batch", "train_batch_indices"]

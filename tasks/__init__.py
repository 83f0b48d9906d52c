"""SeqIO task definitions (tasks/sequence_tasks.py, tasks/text_tasks.py).

Importing registers nothing: `input_pipeline.SequenceData` registers the task
it serves, and `sequence_tasks.register_builtin_tasks()` the built-in ones.
"""

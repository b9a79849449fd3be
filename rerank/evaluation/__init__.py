"""The evaluation harness: readers for queries/qrels/events, seeded splits, baseline systems, the runner
and the report. ``fusionrank eval`` (workers/commands/evaluate.py) is its command line."""

"""User functions: model and measurement, deployment, scheduling, invocation, receipts."""

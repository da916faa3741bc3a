"""The tools beside the service: the bench, replay and reprocess of captures, the subscribers, the doc generators."""

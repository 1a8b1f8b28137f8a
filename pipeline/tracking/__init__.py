"""MLflow, and only MLflow: the store, publishing a run record, the registry, the model, listing.

Nothing else in the project imports MLflow. The flow writes its results to a local run record
(:mod:`pipeline.record`); :func:`pipeline.tracking.publish.publish` mirrors it into MLflow.
"""

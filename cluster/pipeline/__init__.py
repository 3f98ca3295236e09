"""The asynchronous pipeline (``driver=ray``): the controller's step loop (controller), the queue
consumer (consuming), generator supervision (supervision), weight publishing (publishing), the
resume's reconciliation (recovery), the topology (the only place that applies ``ray.remote`` /
``.options``) and the embedded Redis launcher (redis_launcher)."""

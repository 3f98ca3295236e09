"""The asynchronous pipeline (``driver=ray``): the controller's step loop (controller), the queue
consumer (consuming), generator supervision (supervision), weight publishing (publishing), the
resume's checks and reconciliation (recovery), the driver's Ray connection (ray_session), the
topology (the only place that applies ``ray.remote`` / ``.options``) and the embedded Redis launcher
(redis_launcher)."""

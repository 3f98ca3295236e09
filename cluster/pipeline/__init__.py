"""The asynchronous pipeline (``driver=ray``): the controller loops, the topology (the only place that
applies ``ray.remote`` / ``.options``) and the embedded Redis launcher."""

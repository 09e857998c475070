"""`maskformer bench`: the model-level sweep (backends x batch sizes) and the server-level load sweep
(concurrency levels against live servers), written as JSON, a markdown table and a PNG plot."""

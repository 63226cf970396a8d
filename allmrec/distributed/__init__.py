"""The one thin layer of allmrec that knows Ray: Ray Data pipelines, Ray Train loops."""

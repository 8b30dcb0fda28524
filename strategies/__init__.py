"""Server strategies: one file per method, aggregation math in :mod:`strategies.aggregation`."""

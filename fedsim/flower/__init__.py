"""The only fedsim package that imports flwr: strategy, client handlers, codec, in-process grid."""

"""gRPC API: `hybridserve.proto` and its generated modules (committed; regenerate with
`python -m router.proto.generate` after editing the .proto)."""

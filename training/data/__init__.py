"""Dataset tooling: import, export and convert annotated radiographs (`toothseg import`, `export`,
`predict`, `evaluate`), Labelme files, and the synthetic panoramics the tests and benchmarks train on."""

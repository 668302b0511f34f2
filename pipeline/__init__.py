"""The stages, one package each, in the order the design card runs them:

    common/    settings, errors, run folders, locks, progress, TensorBoard: imported by every stage
    extract/   stage one: videos -> Zarr cache (frames, teacher outputs, flow)
    distill/   stage two: cache -> student checkpoint; the concept bank for lss
    evaluate/  labelled tasks, features, protocols, reports; embed and export
    demo/      a generated benchmark and the whole pipeline on it

A stage imports only the ones above it in this list (tests/test_layers.py checks it), and none of them
is imported by cache/ or models/."""

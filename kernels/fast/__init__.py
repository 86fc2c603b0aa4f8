"""Fast paths for small-batch decoding on a CPU: the references' math in far fewer torch calls.

At decode sizes (1-5 tokens of one sequence) a CPU spends more time dispatching ops than computing,
so each function here is the reference it replaces (kernels/reference/) rewritten to issue a handful
of ops whatever the token count: a verification pass over k+1 tokens then costs about what a decode
step costs. tests/unit/kernels/test_fast_ops.py checks each against its reference on random inputs.
"""

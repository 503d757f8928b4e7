"""Loaded by scripts/fuzz through SCHEMATHESIS_HOOKS.

Hypothesis describes the lambdas inside its strategies by parsing their module's source with
`ast.parse`. CPython 3.11 before 3.11.8 can fail that parse with
`SystemError: AST constructor recursion depth mismatch` when it is called deep in the stack, as
Hypothesis does for schemathesis's nested strategies: the test generator crashed, no request was
sent, and the run failed on about one run in three. The description only names a function in
reports, so an unknown one is the honest answer; every other error still propagates.
"""

import hypothesis.internal.lambda_sources as lambda_sources

_describe = lambda_sources.lambda_description


def _describe_or_unknown(function):
    try:
        return _describe(function)
    except SystemError as error:
        if "AST constructor recursion depth mismatch" not in str(error):
            raise
        return "lambda: <unknown>"


lambda_sources.lambda_description = _describe_or_unknown

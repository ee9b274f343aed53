"""A minimal domain that follows docs/extending.md; the test suite runs it through fit, test,
predict and its stages."""

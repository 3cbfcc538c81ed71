"""Support shared by the tests and the load tests: real servers, request images, the bad-input corpus."""

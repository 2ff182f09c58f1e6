//! End-to-end tests for skiff; the tests live in tests/.

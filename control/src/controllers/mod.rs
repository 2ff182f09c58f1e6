//! Controllers that run inside skiff-control beside the API server. Each is a
//! level-triggered loop: it looks at the whole state it owns on every relevant change and
//! moves it one step toward the desired state.

pub mod namespace;

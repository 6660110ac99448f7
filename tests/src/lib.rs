pub mod bdb;

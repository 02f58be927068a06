//! mimco: MimCo pre-training of vision transformers (Zhou et al., ACM MM 2022,
//! <https://arxiv.org/abs/2203.03186>).
//!
//! This root crate will hold the Candle trainer (issue #4). Today the workspace ships
//! the shard format and its packer: see the `pipeline` crate (`pipeline::format`,
//! `pipeline::shard`) and the `shardtool` binary.

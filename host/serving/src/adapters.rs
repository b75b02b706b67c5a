//! The adapters a scheduler holds: loaded on first use, kept while requests run through
//! them, and the least recently used idle one unloaded when `max_loras` are held.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use lathe_engine::{Adapter, Device, ModelConfig};

use crate::AdapterRef;

struct Held {
    key: String,
    adapter: Arc<Adapter>,
    users: usize,
    last_used: u64,
}

pub(crate) struct Adapters {
    max: usize,
    held: Vec<Held>,
    clock: u64,
    pub(crate) loads: u64,
}

/// What a sequence keeps of its adapter: the weights and the prefix-cache salt.
#[derive(Clone)]
pub(crate) struct InUse {
    pub key: String,
    pub adapter: Arc<Adapter>,
    pub salt: u64,
}

impl Adapters {
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            held: Vec::new(),
            clock: 0,
            loads: 0,
        }
    }

    /// The adapter for a new user: held already, or loaded now. `Ok(None)` when `max`
    /// adapters are all in use, so the request must wait.
    pub fn acquire(&mut self, r: &AdapterRef, config: &ModelConfig, device: &Device) -> Result<Option<InUse>, String> {
        self.clock += 1;
        let i = match self.held.iter().position(|h| h.key == r.key) {
            Some(i) => i,
            None => {
                if self.held.len() >= self.max {
                    let Some(idle) = self.held.iter().enumerate().filter(|(_, h)| h.users == 0).min_by_key(|(_, h)| h.last_used).map(|(i, _)| i) else {
                        return Ok(None);
                    };
                    self.held.swap_remove(idle);
                }
                let adapter = Adapter::load_peft(&r.dir, config, device).map_err(|e| format!("adapter `{}` cannot be loaded: {e}", r.key))?;
                self.loads += 1;
                self.held.push(Held {
                    key: r.key.clone(),
                    adapter: Arc::new(adapter),
                    users: 0,
                    last_used: 0,
                });
                self.held.len() - 1
            }
        };
        let h = &mut self.held[i];
        h.users += 1;
        h.last_used = self.clock;
        Ok(Some(InUse {
            key: h.key.clone(),
            adapter: h.adapter.clone(),
            salt: salt(&h.key),
        }))
    }

    pub fn release(&mut self, key: &str) {
        if let Some(h) = self.held.iter_mut().find(|h| h.key == key) {
            h.users -= 1;
        }
    }

    /// Adapters in memory now.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

/// A nonzero prefix-cache salt per adapter (zero is the base model's).
fn salt(key: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    h.finish() | 1
}

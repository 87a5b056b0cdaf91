//! Cancel requests: which upstream backend owns each cancel key, and delivery of a
//! client's CancelRequest to it.
//!
//! Clients see the upstream backend's own key (BackendKeyData is relayed unchanged), so
//! a CancelRequest is forwarded as it came, but only for keys of sessions open through
//! this pgveil; unknown keys are dropped, as PostgreSQL itself does.

use std::net::SocketAddr;
use std::time::Duration;

use dashmap::DashMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::{debug, info};

use crate::wire::startup::CancelKey;

/// Live sessions' cancel keys and the upstream address each belongs to.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    owners: DashMap<CancelKey, SocketAddr>,
}

impl CancelRegistry {
    /// Records `key` until the returned guard is dropped.
    pub fn register(&self, key: CancelKey, upstream: SocketAddr) -> CancelRegistration<'_> {
        self.owners.insert(key, upstream);
        CancelRegistration {
            registry: self,
            key,
        }
    }

    pub fn owner(&self, key: &CancelKey) -> Option<SocketAddr> {
        self.owners.get(key).map(|entry| *entry.value())
    }
}

/// Removes a session's key from the registry when the session ends.
pub struct CancelRegistration<'a> {
    registry: &'a CancelRegistry,
    key: CancelKey,
}

impl Drop for CancelRegistration<'_> {
    fn drop(&mut self) {
        self.registry.owners.remove(&self.key);
    }
}

/// Delivers a CancelRequest to the backend that owns `key`.
pub async fn forward(registry: &CancelRegistry, key: CancelKey) {
    let Some(upstream) = registry.owner(&key) else {
        info!(
            process_id = key.process_id,
            "cancel request for an unknown key dropped"
        );
        return;
    };
    let deliver = async {
        let mut socket = TcpStream::connect(upstream).await?;
        socket.write_all(&key.encode_request()).await?;
        // The server answers by closing the connection.
        let mut sink = [0u8; 1];
        let _ = socket.read(&mut sink).await;
        Ok::<_, std::io::Error>(())
    };
    match timeout(Duration::from_secs(10), deliver).await {
        Ok(Ok(())) => debug!(process_id = key.process_id, "cancel request delivered"),
        Ok(Err(error)) => info!(%error, "cancel request could not be delivered"),
        Err(_) => info!("cancel request delivery timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_known_while_registered() {
        let registry = CancelRegistry::default();
        let key = CancelKey {
            process_id: 7,
            secret: [1, 2, 3, 4],
        };
        let address: SocketAddr = "127.0.0.1:5432".parse().unwrap();
        {
            let _registration = registry.register(key, address);
            assert_eq!(registry.owner(&key), Some(address));
            let other = CancelKey {
                process_id: 7,
                secret: [0, 0, 0, 0],
            };
            assert_eq!(registry.owner(&other), None);
        }
        assert_eq!(registry.owner(&key), None);
    }
}

